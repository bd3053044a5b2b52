"""Decode attention over a paged KV cache with Pallas: on TPU Pallas' ragged paged attention kernel
(`jax.experimental.pallas.ops.tpu.ragged_paged_attention`, the kernel vLLM's TPU backend runs), on GPU
our Triton kernel, both reading the cache's own pool layout [P page 2K H] (key/value heads interleaved).

Both read a sequence's pages in table order from the start up to its length, with Gemma's logit
soft-cap and sliding window. Our sliding-window layers keep a ring of pages, so each row's table is
handed over rotated to start at the block holding its oldest visible key, with its length counted
from there: positions shift by the same amount for queries and keys, which changes neither the
causal nor the window mask, and a kernel reads at most the ring's pages.

TPU: float caches (the kernel's int8 takes one scale per tensor; ours are per token and head, read by
the XLA path). Neither Pallas interpreter of jax 0.10 runs this kernel (they stop at its reshaped
refs), so interpret mode keeps the XLA path; tests check the inputs built here against the kernel's
own reference implementation and lower it for TPU. `Kernels` chooses it with the TPU attention
default ("splash").

GPU (`attention="gpu"`, opt-in: `$GEMMA_JAX_ATTENTION=gpu` until it is timed on a GPU): one program
per (row, KV head) runs an online softmax over blocks of its pages, loading each page's keys and
values straight from the pool by table id, float or int8 (per-token scales applied to the logits
and the probabilities, as jax's own GPU paged attention does for its layout [K P page H], which
would need the pool transposed every step). It runs in interpret mode, where tests compare it with
the XLA path, and lowers for CUDA.

On a mesh either runs per shard under `shard_map`: rows over the data axes, KV heads over `tensor`
when they divide it, the pool split by heads like the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
from jax.sharding import PartitionSpec as P

from gemma_jax.kernels.backend import Kernels
from gemma_jax.models.kv_cache import first_visible_page

Array = jax.Array


def paged_attention_applies(cache: dict, kernels: Kernels) -> bool:
    """Will a decode step over `cache` run a Pallas kernel? GPU: any paged cache (interpret mode too);
    TPU: a float paged cache, off interpret mode."""
    if "pages" not in cache:
        return False
    return kernels.attention == "gpu" or (kernels.attention == "splash" and not kernels.interpret and "kv_scale" not in cache)


def paged_decode_attention(
    q: Array, cache: dict, position: Array, *, window: int | None, soft_cap: float | None, kernels: Kernels
) -> Array:
    """q [B K G H] (scaled) at `position` [B], already written to `cache` -> [B K G H]."""
    pool, table = cache["kv"], cache["pages"]
    page, W = pool.shape[1], table.shape[1]
    first = first_visible_page(position, window, page)
    rotated = jnp.take_along_axis(table, (first[:, None] + jnp.arange(W)) % W, axis=1)  # B W, oldest visible first
    lengths = position + 1 - first * page
    scale = cache.get("kv_scale")
    gpu = kernels.attention == "gpu"
    local = functools.partial(_gpu_local if gpu else _tpu_local, window=window, soft_cap=soft_cap, interpret=kernels.interpret)

    layout = kernels.mesh_layout
    if layout is None:
        return local(q, pool, scale, rotated, lengths)
    B, K = q.shape[:2]
    batch, heads = (layout.spec(("act_batch", "act_kv_heads"), (B, K))[i] for i in (0, 1))
    return jax.shard_map(
        local, mesh=layout.mesh, check_vma=False,
        in_specs=(P(batch, heads), P(None, None, heads), None if scale is None else P(None, None, heads), P(batch), P(batch)),
        out_specs=P(batch, heads),
    )(q, pool, scale, rotated, lengths)  # fmt: skip


def _tpu_local(q, pool, scale, rotated, lengths, *, window, soft_cap, interpret):
    """One shard on TPU: [b k G H], [P page 2k H], -, [b W], [b] -> [b k G H]."""
    del scale, interpret  # float caches only; never interpreted (see the module docstring)
    # Off a TPU (export lowering) the kernel's tuned block sizes, looked up by TPU version, are not
    # available: read up to 8 pages per step, 8 queries per block.
    on_tpu = jax.devices()[0].platform == "tpu"
    blocks = {} if on_tpu else dict(num_kv_pages_per_block=min(rotated.shape[1], 8), num_queries_per_block=8)
    b, k, G, H = q.shape
    out = ragged_paged_attention(
        q.reshape(b, k * G, H), pool, lengths, rotated, jnp.arange(b + 1, dtype=jnp.int32),
        jnp.array([b], jnp.int32), sm_scale=1.0, sliding_window=window, soft_cap=soft_cap, **blocks,
    )  # fmt: skip
    return out.reshape(b, k, G, H)


_GPU_BLOCK_TOKENS = 64  # keys per online-softmax step (whole pages)
_GPU_MIN_ROWS = 16  # Triton's dot wants >= 16 rows: the G query heads of a KV head are padded to it
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so exp(masked - max) is 0, never nan


def _gpu_local(q, pool, scale, rotated, lengths, *, window, soft_cap, interpret):
    """One shard on GPU: q [b k G H], pool [P page 2k H], scale [P page 2k] or None, tables [b W], lengths [b]."""
    b, k, G, H = q.shape
    P_, page = pool.shape[:2]
    per_block = max(1, min(rotated.shape[1], _GPU_BLOCK_TOKENS // page))
    rows = -(-G // _GPU_MIN_ROWS) * _GPU_MIN_ROWS
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - G), (0, 0)))
    tables = jnp.pad(rotated, ((0, 0), (0, -rotated.shape[1] % per_block)))  # padding: the null page, never read
    head = lambda which: pl.BlockSpec((P_, page, None, H), lambda i, h: (0, 0, 2 * h + which, 0))
    head_scale = lambda which: pl.BlockSpec((P_, page, None), lambda i, h: (0, 0, 2 * h + which))
    quantized = scale is not None
    operands = [q, pool, pool, *((scale, scale) if quantized else ()), tables, lengths]
    specs = [pl.BlockSpec((None, None, rows, H), lambda i, h: (i, h, 0, 0)), head(0), head(1),
             *((head_scale(0), head_scale(1)) if quantized else ()),
             pl.BlockSpec((None, tables.shape[1]), lambda i, h: (i, 0)), pl.BlockSpec((1,), lambda i, h: (i,))]  # fmt: skip
    kernel = functools.partial(_gpu_kernel, per_block=per_block, window=window, soft_cap=soft_cap, quantized=quantized)
    out = pl.pallas_call(
        kernel, grid=(b, k), in_specs=specs,
        out_specs=pl.BlockSpec((None, None, rows, H), lambda i, h: (i, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), name="gemma_paged_decode_attention",
    )(*operands)  # fmt: skip
    return out[:, :, :G]


def _gpu_kernel(q_ref, k_ref, v_ref, *refs, per_block: int, window: int | None, soft_cap: float | None, quantized: bool):
    """One (row, KV head): q [R H]; keys/values [P page H] (scales [P page]); table [W]; length [1] -> out [R H]."""
    k_scale_ref, v_scale_ref, table_ref, length_ref, o_ref = refs if quantized else (None, None, *refs)
    rows, H = q_ref.shape
    block = per_block * k_ref.shape[1]
    length = length_ref[0]
    q = q_ref[...]

    def body(i, carry):
        o, m, l = carry
        ids = table_ref[pl.ds(i * per_block, per_block)]
        keys, values = k_ref[ids].reshape(block, H), v_ref[ids].reshape(block, H)
        logits = plgpu.dot(q, keys.astype(q.dtype).T)  # R S, float32
        if quantized:
            logits = logits * k_scale_ref[ids].reshape(1, block)
        if soft_cap is not None:
            logits = jnp.tanh(logits / soft_cap) * soft_cap
        key = i * block + jnp.arange(block)  # counted from the oldest visible block; the query is at length - 1
        visible = key < length if window is None else (key < length) & (key >= length - window)
        logits = jnp.where(visible[None, :], logits, _MASKED)
        m_new = jnp.maximum(m, logits.max(axis=-1))
        p = jnp.exp(logits - m_new[:, None])
        rescale = jnp.exp(m - m_new)
        weights = p * v_scale_ref[ids].reshape(1, block) if quantized else p
        o = o * rescale[:, None] + plgpu.dot(weights.astype(q.dtype), values.astype(q.dtype))
        return o, m_new, l * rescale + p.sum(axis=-1)

    init = (jnp.zeros((rows, H), jnp.float32), jnp.full((rows,), _MASKED, jnp.float32), jnp.zeros((rows,), jnp.float32))
    o, _, l = jax.lax.fori_loop(0, pl.cdiv(length, block), body, init)
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
