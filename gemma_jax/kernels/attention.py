"""Full-sequence attention on TPU with Pallas' splash attention kernel (`jax.experimental.pallas.ops.tpu`).

The dense XLA path (models/gemma/model.py) materialises [B N T S] float32 logits: at T = S = 8192 that is
256 MiB per head and row, which is what long prefills and fine-tuning at full context would
hold in HBM. Splash attention streams key blocks through VMEM with an online softmax, skips
blocks the mask rules out (a sliding window touches only window / S of them) and applies
Gemma's logit soft-cap inside the kernel; it is the kernel MaxText runs Gemma 2 with.

It serves whole sequences (training, and prefill into a fresh cache) whose length is a multiple
of 128; decode steps and chunks after a cache stay on the dense path. Its masks are by array
index: causal, plus a window of `sliding_window` on local layers, and segment ids keep
documents (and padding, segment 0) apart. That equals our position-based mask whenever
positions rise by one within each segment, as they do for every batch the library builds
(left- or right-padded prompts, packed documents).

GQA runs the multi-query kernel once per KV head, over that head's G query heads. On a mesh
the kernel runs per shard under `shard_map`: batch over the data axes, KV heads over `tensor`
when they divide it (otherwise each tensor shard computes every head: correct, redundant).
A `Kernels` value chooses it (`Kernels.for_platform`: "splash" on TPU, "xla" elsewhere; its
interpret mode runs the kernel on CPU, which is how the tests check it).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from gemma_jax.kernels.backend import Kernels

Array = jax.Array
_BLOCK = 128  # splash's tiling unit: sequence lengths must be multiples of it


def splash_applies(length: int, kernels: Kernels) -> bool:
    """Will full-sequence attention over `length` tokens run the splash kernel?"""
    return kernels.attention == "splash" and length % _BLOCK == 0


def splash_attention(
    q: Array, k: Array, v: Array, segment_ids: Array, *, window: int | None, soft_cap: float | None, kernels: Kernels
) -> Array:
    """q [B T K G H] (already scaled), k and v [B T K H], segment_ids [B T] (0 = padding) -> [B T K G H]."""
    B, T, K, G, H = q.shape
    kernel = _kernel(T, G, window, soft_cap, kernels.interpret)

    def local(q, k, v, segment_ids):  # one shard: [b T k G H], [b T k H], [b T]
        per_head = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s), in_axes=(0, 0, 0, None))  # over k
        per_row = jax.vmap(lambda q, k, v, s: per_head(q, k, v, splash.SegmentIds(s, s)))  # over b
        out = per_row(q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids)
        return out.transpose(0, 3, 1, 2, 4)  # b k G T H -> b T k G H

    layout = kernels.mesh_layout
    if layout is None:
        return local(q, k, v, segment_ids)
    batch, heads = (layout.spec(("act_batch", "act_kv_heads"), (B, K))[i] for i in (0, 1))
    return jax.shard_map(
        local, mesh=layout.mesh, check_vma=False,
        in_specs=(P(batch, None, heads), P(batch, None, heads), P(batch, None, heads), P(batch)), out_specs=P(batch, None, heads),
    )(q, k, v, segment_ids)  # fmt: skip


@functools.lru_cache(maxsize=64)
def _kernel(length: int, group: int, window: int | None, soft_cap: float | None, interpret: bool):
    """The multi-query splash kernel for one shape: causal, or causal within `window` (built once per shape)."""
    shape = (length, length)
    mask = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    q_block, kv_block = _block(length, 512), _block(length, 1024)
    blocks = splash.BlockSizes(
        block_q=q_block, block_kv=kv_block, block_kv_compute=_block(kv_block, 512),
        block_q_dkv=q_block, block_kv_dkv=kv_block, block_kv_dkv_compute=_block(kv_block, 512),
        block_q_dq=q_block, block_kv_dq=kv_block,
    )  # fmt: skip
    with jax.ensure_compile_time_eval():  # concrete mask tables, reusable by later traces (no leaked tracers)
        return splash.make_splash_mqa_single_device(
            masks.MultiHeadMask([mask] * group), block_sizes=blocks, attn_logits_soft_cap=soft_cap, interpret=interpret
        )


def _block(length: int, target: int) -> int:
    """The largest power-of-two multiple of 128, at most `target`, that divides `length`."""
    block = _BLOCK
    while block * 2 <= target and length % (block * 2) == 0:
        block *= 2
    return block
