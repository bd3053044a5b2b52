"""The KV cache every family's attention layers share: its layout, writes, and what a layer attends over.

Per layer, keys [B K S H], values [B K H S] and the position of each slot (-1 = empty): each
attention matmul then contracts the innermost dim of both operands, which XLA runs without
relaying out the cache every step. Token p is written to slot p % S, so global layers (S = max
length) fill linearly and sliding-window layers (S = window) are ring buffers that only ever hold
`window` entries.

An int8 cache (created with dtype int8) stores keys and values as int8 with one float32 scale per
token and head (symmetric absmax over H), `k_scale`/`v_scale` [B K S]: half the bytes of bf16 for
head_dim 256 (the scales add 4 bytes per token and head). Reads dequantize to the compute dtype.

A paged layer cache (the engine's, `paged_cache`) holds keys and values in one pool of fixed-size
pages, `kv` [P page 2K H] with key and value heads interleaved (k0 v0 k1 v1 ...: the layout of
Pallas' ragged paged attention kernel), and a page table per sequence, `pages` [B W]. Token p
of a sequence lives in page `pages[b, (p // page) % W]` at offset p % page: a global layer's
table has a page for every block of `max_len` (W = max_len / page; it never wraps), a sliding-
window layer's is a ring of W = window / page + 1 pages that always holds the last `window`
tokens. Page 0 is the null page: unused table entries point at it, writes of free rows land in it,
and no read ever keeps what it holds (every read is masked by position).

A decode step reads the cache block by block (`blocks`), only as far as the longest row has
filled it: its cost follows the tokens a batch holds, not the capacity.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from gemma_jax.sharding import Layout, constrain

Array = jax.Array
LayerCache = dict[str, Array]  # dense {"k", "v", "pos"} or paged {"kv", "pages"} (+ scales when int8)
Cache = dict[str, LayerCache]  # keyed by layer name, "layer_{i}"
INT8_MAX = 127.0
CACHE_AXES = {
    "k": ("cache_batch", "cache_kv_heads", "cache_length", "head_dim"),
    "v": ("cache_batch", "cache_kv_heads", "head_dim", "cache_length"),
    "pos": ("cache_batch", "cache_length"),
    "k_scale": ("cache_batch", "cache_kv_heads", "cache_length"),
    "v_scale": ("cache_batch", "cache_kv_heads", "cache_length"),
    # paged: the pool is shared by every sequence (split by heads only); the tables are tiny
    "kv": (None, None, "cache_kv_heads", "head_dim"),
    "kv_scale": (None, None, "cache_kv_heads"),
    "pages": (None, None),
}
DECODE_BLOCK = 256  # keys a decode step reads per iteration (a multiple of the page size)


def layer_cache(batch: int, slots: int, kv_heads: int, head_dim: int, dtype: Any, layout: Layout | None) -> LayerCache:
    """One layer's empty cache of `slots` slots (int8 with scales when `dtype` is int8), on `layout` when traced."""
    B, K, S, H = batch, kv_heads, slots, head_dim
    layer = {"k": jnp.zeros((B, K, S, H), dtype), "v": jnp.zeros((B, K, H, S), dtype), "pos": jnp.full((B, S), -1, jnp.int32)}
    if jnp.dtype(dtype) == jnp.int8:
        layer |= {"k_scale": jnp.zeros((B, K, S), jnp.float32), "v_scale": jnp.zeros((B, K, S), jnp.float32)}
    return {name: constrain(x, CACHE_AXES[name], layout) for name, x in layer.items()}


def paged_cache(dense: Cache, max_len: int, page: int, pages: dict[int, int], rows: int, layout: Layout | None) -> Cache:
    """The paged counterpart of a family's (abstract) dense cache for `rows` sequences of up to `max_len` tokens:
    each layer's table is as wide as its dense slots need (`table_width`), and its pool holds `pages[width]`
    pages (page 0, the null page, included). Stacked layers (a scanned model's) keep their leading axes."""
    out = {}
    for name, layer in dense.items():
        *lead, B, K, S, H = layer["k"].shape
        W = table_width(S, max_len, page)
        zeros = lambda *shape, dtype=jnp.float32: jnp.zeros((*lead, *shape), dtype)
        kv = {"kv": zeros(pages[W], page, 2 * K, H, dtype=layer["k"].dtype), "pages": zeros(rows, W, dtype=jnp.int32)}
        if "k_scale" in layer:
            kv["kv_scale"] = zeros(pages[W], page, 2 * K)
        out[name] = {key: constrain(x, (None,) * len(lead) + CACHE_AXES[key], layout) for key, x in kv.items()}
    return out


def table_width(slots: int, max_len: int, page: int) -> int:
    """Pages in a sequence's table for a layer of `slots` dense slots: every block of `max_len`, or for a
    sliding window (slots < max_len) a ring one page longer than the window, so it always holds the window."""
    blocks = -(-max_len // page)
    return blocks if slots >= max_len else min(blocks, -(-slots // page) + 1)


def pool_pages(width: int, max_len: int, page: int, kv_tokens: int, rows: int) -> int:
    """Pages in the pool of a layer whose tables are `width` wide (the null page included): global layers'
    pools hold the budget of `kv_tokens` tokens; rings need at most one ring per row, so they never limit
    admission."""
    return 1 + (-(-kv_tokens // page) if width == -(-max_len // page) else rows * width)


def _quantize(x: Array) -> tuple[Array, Array]:
    """[..., H] -> (int8 [..., H], float32 scale [...]): symmetric absmax over head_dim; a zero row stays zero."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / INT8_MAX
    q = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0)[..., None])
    return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def _kept(k_pos: Array, slots: int) -> Array:
    """[B T] which new tokens a cache of `slots` keeps: valid ones a ring would not overwrite in this same write."""
    newest = jnp.max(k_pos, axis=1, keepdims=True)  # B 1
    return (k_pos >= 0) & (k_pos > newest - slots)


def write_cache(cache: LayerCache, k: Array, v: Array, k_pos: Array) -> LayerCache:
    """Write new keys/values [B T K H] at positions k_pos [B T] (-1: skip); tokens a ring would overwrite in
    the same write are dropped."""
    if "pages" in cache:
        return _write_pages(cache, k, v, k_pos)
    slots = cache["pos"].shape[1]
    slot = jnp.where(_kept(k_pos, slots), k_pos % slots, slots)  # B T; out of range -> dropped by mode="drop"
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


def _write_pages(cache: LayerCache, k: Array, v: Array, k_pos: Array) -> LayerCache:
    """`write_cache` into pages (quantized on the way in for an int8 pool)."""
    B, T, K, H = k.shape
    kv = jnp.stack([k, v], axis=3).reshape(B, T, 2 * K, H)  # heads interleaved: k0 v0 k1 v1 ...
    kv, scale = _quantize(kv) if "kv_scale" in cache else (kv, None)
    return write_pages(cache, cache["pages"], kv, scale, k_pos)


def write_pages(cache: LayerCache, table: Array, kv: Array, scale: Array | None, k_pos: Array) -> LayerCache:
    """Token p of row b (kv [B T 2K H], int8 `scale` [B T 2K]) goes to page table[b, (p // page) % W] at offset
    p % page; invalid tokens and those the ring overwrites in this same write are dropped."""
    pool = cache["kv"]
    P, page, W = pool.shape[0], pool.shape[1], table.shape[1]
    block = jnp.take_along_axis(table, (jnp.maximum(k_pos, 0) // page) % W, axis=1)  # B T
    block = jnp.where(_kept(k_pos, W * page), block, P)  # out of range -> dropped
    new = dict(cache)
    if scale is not None:
        new["kv_scale"] = cache["kv_scale"].at[block, k_pos % page].set(scale, mode="drop")
    new["kv"] = pool.at[block, k_pos % page].set(kv.astype(pool.dtype), mode="drop")
    return new


def read_cache(cache: LayerCache, dtype: Any) -> tuple[Array, Array]:
    """A dense cache's keys [B K S H] and values [B K H S] in `dtype` (dequantized when int8)."""
    if "k_scale" not in cache:
        return cache["k"].astype(dtype), cache["v"].astype(dtype)
    keys = cache["k"].astype(jnp.float32) * cache["k_scale"][..., None]
    values = cache["v"].astype(jnp.float32) * cache["v_scale"][:, :, None, :]
    return keys.astype(dtype), values.astype(dtype)


# One block of a decode read: keys [B K S H], values [B K S H] (in the compute dtype) and each key's
# position [B S], -1 where the block holds nothing the row may read.
Block = tuple[Array, Array, Array]


def blocks(cache: LayerCache, position: Array, window: int | None, dtype: Any) -> tuple[Array, Callable[[Array], Block]]:
    """How a decode step at `position` [B] (its token already written) reads the cache: (the number of
    blocks to read, traced; block r's keys, values and positions). Only blocks some row has filled are read."""
    if "pages" in cache:
        return _page_blocks(cache, position, window, dtype)
    slots = cache["pos"].shape[1]
    size = min(slots, DECODE_BLOCK)
    filled = jnp.minimum(jnp.max(position) + 1, slots)  # slot p % slots: global caches fill 0..p, rings wrap

    def read(r: Array) -> Block:
        start = jnp.minimum(r * size, slots - size)  # the last block overlaps the one before when size ∤ slots
        part = {name: jax.lax.dynamic_slice_in_dim(x, start, size, CACHE_AXES[name].index("cache_length"))
                for name, x in cache.items()}  # fmt: skip
        keys, values = read_cache(part, dtype)
        fresh = start + jnp.arange(size) >= r * size  # slots an earlier block did not read
        return keys, values.swapaxes(2, 3), jnp.where(fresh, part["pos"], -1)

    return -(-filled // size), read


def first_visible_page(position: Array, window: int | None, page: int) -> Array:
    """[B] the block (counted from the sequence's start) holding each row's oldest key visible from `position`."""
    return jnp.zeros_like(position) if window is None else jnp.maximum(position - window + 1, 0) // page


def _page_blocks(cache: LayerCache, position: Array, window: int | None, dtype: Any) -> tuple[Array, Callable[[Array], Block]]:
    """`blocks` of a paged cache: each row reads its table from the block holding its oldest visible key,
    `DECODE_BLOCK // page` pages at a time (the same few ring pages of a sliding-window layer)."""
    pool, table = cache["kv"], cache["pages"]
    page, W = pool.shape[1], table.shape[1]
    per_block = max(1, min(W, DECODE_BLOCK // page))
    first = first_visible_page(position, window, page)  # B
    pages_needed = jnp.max(position // page - first) + 1

    def read(r: Array) -> Block:
        logical = first[:, None] + r * per_block + jnp.arange(per_block)  # B n: block index within the sequence
        ids = jnp.take_along_axis(table, logical % W, axis=1)  # B n
        B, n = ids.shape
        kv = pool[ids].reshape(B, n * page, *pool.shape[2:])  # B S 2K H
        if "kv_scale" in cache:
            kv = kv.astype(jnp.float32) * cache["kv_scale"][ids].reshape(B, n * page, -1)[..., None]
        kv = kv.astype(dtype).swapaxes(1, 2)  # B 2K S H
        # Blocks past a row's position hold other tokens (or nothing): their positions exceed it and are masked.
        return kv[:, 0::2], kv[:, 1::2], (logical[:, :, None] * page + jnp.arange(page)).reshape(B, n * page)

    return -(-pages_needed // per_block), read


def as_keys(k: Array) -> Array:
    """[B T K H] -> the cache's key layout [B K T H]."""
    return k.transpose(0, 2, 1, 3)


def as_values(v: Array) -> Array:
    """[B T K H] -> the cache's value layout [B K H T]."""
    return v.transpose(0, 2, 3, 1)


class Attended(NamedTuple):
    """What one attention layer attends over (KV-sharing layers reuse their source's)."""

    k: Array  # B T K H: this call's keys (what the splash kernel reads)
    v: Array  # B T K H
    keys: Array | None  # B K S H: every key attended over (chunk, or cache + chunk); None in a decode step
    values: Array | None  # B K H S
    key_pos: Array | None  # B S: position of each key, -1 = empty or padding
    same_segment: Array | None  # B T S for whole sequences; None when reading a cache (positions suffice)
    cache: LayerCache | None  # the updated cache: what a decode step reads, block by block


def attended(
    cache: LayerCache | None, k: Array, v: Array, positions: Array, segment_ids: Array, fresh_cache: bool
) -> Attended:
    """What a layer attends over given its new keys/values [B T K H], and its updated cache.

    A decode step writes first, then reads the cache block by block (`blocks`); a chunk after earlier
    tokens reads cache + chunk; whole sequences (or a first chunk into an empty cache) read the chunk.
    """
    k_pos = jnp.where(segment_ids > 0, positions, -1)
    if cache is not None and k.shape[1] == 1:  # decode step
        return Attended(k, v, None, None, None, None, write_cache(cache, k, v, k_pos))
    if cache is not None and not fresh_cache:  # chunk after earlier tokens
        if "pages" in cache:
            raise ValueError("a paged cache is filled by a fresh prefill and read by decode steps only")
        keys, values = read_cache(cache, k.dtype)
        keys, values = jnp.concatenate([keys, as_keys(k)], axis=2), jnp.concatenate([values, as_values(v)], axis=3)
        key_pos = jnp.concatenate([cache["pos"], k_pos], axis=1)
        return Attended(k, v, keys, values, key_pos, None, write_cache(cache, k, v, k_pos))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    new_cache = None if cache is None else write_cache(cache, k, v, k_pos)
    return Attended(k, v, as_keys(k), as_values(v), k_pos, same_segment, new_cache)
