"""Decode attention over a paged KV cache on TPU with Pallas' ragged paged attention kernel
(`jax.experimental.pallas.ops.tpu.ragged_paged_attention`, the kernel vLLM's TPU backend runs).

The kernel reads a sequence's pages in table order from page 0 up to its length, with Gemma's
logit soft-cap and sliding window. Our sliding-window layers keep a ring of pages, so each row's
table is handed over rotated to start at the block holding its oldest visible key, with its
length counted from there: positions shift by the same amount for queries and keys, which
changes neither the causal nor the window mask, and the kernel reads at most the ring's pages.

It serves float caches (the kernel's int8 takes one scale per tensor; ours are per token and head,
read by the XLA path). On a mesh it runs per shard under `shard_map`: rows over the data axes,
KV heads over `tensor` when they divide it, the pool split by heads like the cache. `Kernels`
chooses it with the TPU attention default ("splash"). Neither Pallas interpreter of jax 0.10 runs
this kernel (they stop at its reshaped refs), so interpret mode keeps the XLA path; tests check the
inputs built here against the kernel's own reference implementation and lower it for TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
from jax.sharding import PartitionSpec as P

from gemma_jax.kernels.backend import Kernels
from gemma_jax.models.kv_cache import first_visible_page

Array = jax.Array


def paged_attention_applies(cache: dict, kernels: Kernels) -> bool:
    """Will a decode step over `cache` run the Pallas kernel (a float paged cache, TPU attention backend)?"""
    return kernels.attention == "splash" and not kernels.interpret and "pages" in cache and "kv_scale" not in cache


def paged_decode_attention(
    q: Array, cache: dict, position: Array, *, window: int | None, soft_cap: float | None, kernels: Kernels
) -> Array:
    """q [B K G H] (scaled) at `position` [B], already written to `cache` -> [B K G H]."""
    pool, table = cache["kv"], cache["pages"]
    page, W = pool.shape[1], table.shape[1]
    first = first_visible_page(position, window, page)
    rotated = jnp.take_along_axis(table, (first[:, None] + jnp.arange(W)) % W, axis=1)  # B W, oldest visible first
    lengths = position + 1 - first * page

    # Off a TPU (export lowering) the kernel's tuned block sizes, looked up by TPU version, are not
    # available: read up to 8 pages per step, 8 queries per block.
    on_tpu = jax.devices()[0].platform == "tpu"
    blocks = {} if on_tpu else dict(num_kv_pages_per_block=min(W, 8), num_queries_per_block=8)

    def local(q, pool, rotated, lengths):  # one shard: [b k G H], [P page 2k H], [b W], [b]
        b, k, G, H = q.shape
        out = ragged_paged_attention(
            q.reshape(b, k * G, H), pool, lengths, rotated, jnp.arange(b + 1, dtype=jnp.int32),
            jnp.array([b], jnp.int32), sm_scale=1.0, sliding_window=window, soft_cap=soft_cap, **blocks,
        )  # fmt: skip
        return out.reshape(b, k, G, H)

    layout = kernels.mesh_layout
    if layout is None:
        return local(q, pool, rotated, lengths)
    B, K = q.shape[:2]
    batch, heads = (layout.spec(("act_batch", "act_kv_heads"), (B, K))[i] for i in (0, 1))
    return jax.shard_map(
        local, mesh=layout.mesh, check_vma=False,
        in_specs=(P(batch, heads), P(None, None, heads), P(batch), P(batch)), out_specs=P(batch, heads),
    )(q, pool, rotated, lengths)  # fmt: skip
