"""The KV cache every family's attention layers share: its layout, writes, and what a layer attends over.

Per layer, keys [B K S H], values [B K H S] and the position of each slot (-1 = empty): each
attention matmul then contracts the innermost dim of both operands, which XLA runs without
relaying out the cache every step. Token p is written to slot p % S, so global layers (S = max
length) fill linearly and sliding-window layers (S = window) are ring buffers that only ever hold
`window` entries.

An int8 cache (created with dtype int8) stores keys and values as int8 with one float32 scale per
token and head (symmetric absmax over H), `k_scale`/`v_scale` [B K S]: half the bytes of bf16 for
head_dim 256 (the scales add 4 bytes per token and head). Reads dequantize to the compute dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gemma_jax.sharding import Layout, constrain

Array = jax.Array
LayerCache = dict[str, Array]  # {"k", "v", "pos"} (+ {"k_scale", "v_scale"} when int8)
Cache = dict[str, LayerCache]  # keyed by layer name, "layer_{i}"
INT8_MAX = 127.0
CACHE_AXES = {
    "k": ("cache_batch", "cache_kv_heads", "cache_length", "head_dim"),
    "v": ("cache_batch", "cache_kv_heads", "head_dim", "cache_length"),
    "pos": ("cache_batch", "cache_length"),
    "k_scale": ("cache_batch", "cache_kv_heads", "cache_length"),
    "v_scale": ("cache_batch", "cache_kv_heads", "cache_length"),
}


def layer_cache(batch: int, slots: int, kv_heads: int, head_dim: int, dtype: Any, layout: Layout | None) -> LayerCache:
    """One layer's empty cache of `slots` slots (int8 with scales when `dtype` is int8), on `layout` when traced."""
    B, K, S, H = batch, kv_heads, slots, head_dim
    layer = {"k": jnp.zeros((B, K, S, H), dtype), "v": jnp.zeros((B, K, H, S), dtype), "pos": jnp.full((B, S), -1, jnp.int32)}
    if jnp.dtype(dtype) == jnp.int8:
        layer |= {"k_scale": jnp.zeros((B, K, S), jnp.float32), "v_scale": jnp.zeros((B, K, S), jnp.float32)}
    return {name: constrain(x, CACHE_AXES[name], layout) for name, x in layer.items()}


def _quantize(x: Array) -> tuple[Array, Array]:
    """[B T K H] -> (int8 [B T K H], float32 scale [B T K]): symmetric absmax over head_dim; a zero row stays zero."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / INT8_MAX
    q = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0)[..., None])
    return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def write_cache(cache: LayerCache, k: Array, v: Array, k_pos: Array) -> LayerCache:
    """Scatter new keys/values [B T K H] into slot pos % S; invalid tokens and those a ring would overwrite are dropped."""
    slots = cache["pos"].shape[1]
    newest = jnp.max(k_pos, axis=1, keepdims=True)  # B 1
    keep = (k_pos >= 0) & (k_pos > newest - slots)
    slot = jnp.where(keep, k_pos % slots, slots)  # B T; out of range -> dropped by mode="drop"
    rows = jnp.arange(k_pos.shape[0])[:, None]
    # (rows, slot) index [B T] first, then the other dims in order: each update is [B T K H] ([B T K] for scales).
    new = {"pos": cache["pos"].at[rows, slot].set(k_pos, mode="drop")}
    if "k_scale" in cache:
        (k, k_scale), (v, v_scale) = _quantize(k), _quantize(v)
        new |= {"k_scale": cache["k_scale"].at[rows, :, slot].set(k_scale, mode="drop"),
                "v_scale": cache["v_scale"].at[rows, :, slot].set(v_scale, mode="drop")}  # fmt: skip
    new |= {"k": cache["k"].at[rows, :, slot].set(k.astype(cache["k"].dtype), mode="drop"),
            "v": cache["v"].at[rows, :, :, slot].set(v.astype(cache["v"].dtype), mode="drop")}  # fmt: skip
    return new


def read_cache(cache: LayerCache, dtype: Any) -> tuple[Array, Array]:
    """The cache's keys [B K S H] and values [B K H S] in `dtype` (dequantized when int8)."""
    if "k_scale" not in cache:
        return cache["k"].astype(dtype), cache["v"].astype(dtype)
    keys = cache["k"].astype(jnp.float32) * cache["k_scale"][..., None]
    values = cache["v"].astype(jnp.float32) * cache["v_scale"][:, :, None, :]
    return keys.astype(dtype), values.astype(dtype)


def as_keys(k: Array) -> Array:
    """[B T K H] -> the cache's key layout [B K T H]."""
    return k.transpose(0, 2, 1, 3)


def as_values(v: Array) -> Array:
    """[B T K H] -> the cache's value layout [B K H T]."""
    return v.transpose(0, 2, 3, 1)


def attended(
    cache: LayerCache | None, k: Array, v: Array, positions: Array, segment_ids: Array, fresh_cache: bool
) -> tuple[Array, Array, Array, Array | None, LayerCache | None]:
    """What a layer attends over given its new keys/values [B T K H]: (keys [B K S H], values [B K H S],
    key positions [B S], same-segment mask [B T S] or None when positions suffice, the updated cache).

    A decode step writes first, then reads only the cache; a chunk after earlier tokens reads cache +
    chunk; whole sequences (or a first chunk into an empty cache) read the chunk.
    """
    k_pos = jnp.where(segment_ids > 0, positions, -1)
    if cache is not None and k.shape[1] == 1:  # decode step
        cache = write_cache(cache, k, v, k_pos)
        keys, values = read_cache(cache, k.dtype)
        return keys, values, cache["pos"], None, cache
    if cache is not None and not fresh_cache:  # chunk after earlier tokens
        keys, values = read_cache(cache, k.dtype)
        keys, values = jnp.concatenate([keys, as_keys(k)], axis=2), jnp.concatenate([values, as_values(v)], axis=3)
        return keys, values, jnp.concatenate([cache["pos"], k_pos], axis=1), None, write_cache(cache, k, v, k_pos)
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return as_keys(k), as_values(v), k_pos, same_segment, None if cache is None else write_cache(cache, k, v, k_pos)
