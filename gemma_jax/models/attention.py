"""Softmax attention over what a layer attends to (`kv_cache.Attended`), the same for every family.

Whole sequences and chunks attend over materialised keys: dense XLA, or Pallas splash attention
on TPU (kernels/attention.py). A decode step never materialises the cache: it runs an online
softmax over the cache's blocks (`kv_cache.blocks`) up to the longest row's filled length, so a
step with 128 tokens in a cache of 8192 reads 256 keys per row, not 8192; on TPU a paged cache is
read by Pallas' ragged paged attention kernel instead (kernels/paged_attention.py).

Queries arrive scaled; `soft_cap` caps the logits (Gemma 2) before the mask. A key is visible to a
query when it is valid (position >= 0), not in the future, in the same segment (whole sequences),
and on sliding-window layers fewer than `window` positions back.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from gemma_jax.kernels import Kernels
from gemma_jax.kernels.attention import splash_applies, splash_attention
from gemma_jax.kernels.paged_attention import paged_attention_applies, paged_decode_attention
from gemma_jax.layers import soft_cap as cap_logits
from gemma_jax.models.kv_cache import Attended, LayerCache, blocks

Array = jax.Array
MASKED = jnp.finfo(jnp.float32).min


def attention_mask(q_pos: Array, k_pos: Array, window: int | None, same_segment: Array | None) -> Array:
    """[B T S] bool: which keys each query may attend to. Positions < 0 mark invalid keys."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= q - k < window
    return mask if same_segment is None else mask & same_segment


def attend(
    q: Array, att: Attended, positions: Array, segment_ids: Array, *, window: int | None, soft_cap: float | None,
    kernels: Kernels, record: Callable[[Array], None] | None = None,
) -> Array:  # fmt: skip
    """Queries [B T N H] (already scaled) over `att` -> [B T N H]. `record` sees the largest |logit| before
    the cap where the logits are materialised (how tests check that the cap is exercised)."""
    B, T, N, H = q.shape
    K = att.k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    if att.keys is None:  # decode step: read the cache
        out = decode_attention(q[:, 0], att.cache, positions[:, 0], window, soft_cap, kernels)[:, None]
    elif att.same_segment is not None and splash_applies(T, kernels):  # whole sequences: Pallas, no [T S] logits
        out = splash_attention(q, att.k, att.v, segment_ids, window=window, soft_cap=soft_cap, kernels=kernels)
    else:
        mask = attention_mask(positions, att.key_pos, window, att.same_segment)  # B T S
        logits = jnp.einsum("BTKGH,BKSH->BKGTS", q, att.keys.astype(q.dtype), preferred_element_type=jnp.float32)
        if record is not None:
            record(jnp.max(jnp.abs(logits)))
        logits = jnp.where(mask[:, None, None], cap_logits(logits, soft_cap), MASKED)
        probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
        out = jnp.einsum("BKGTS,BKHS->BTKGH", probs, att.values.astype(q.dtype))
    return out.reshape(B, T, N, H)


def decode_attention(
    q: Array, cache: LayerCache, position: Array, window: int | None, soft_cap: float | None, kernels: Kernels
) -> Array:
    """One new query per row, q [B K G H] at `position` [B], over the cache it was just written to -> [B K G H].

    An online softmax over the filled blocks: running max m, normaliser l and weighted sum acc per
    query, rescaled whenever a block raises the max (the float32 result equals the dense softmax's to
    rounding)."""
    if paged_attention_applies(cache, kernels):
        return paged_decode_attention(q, cache, position, window=window, soft_cap=soft_cap, kernels=kernels)
    count, read = blocks(cache, position, window, q.dtype)
    B, K, G, H = q.shape

    def body(r, carry):
        m, l, acc = carry
        keys, values, key_pos = read(r)  # B K S H, B K S H, B S
        mask = attention_mask(position[:, None], key_pos, window, None)[:, 0]  # B S
        logits = cap_logits(jnp.einsum("BKGH,BKSH->BKGS", q, keys, preferred_element_type=jnp.float32), soft_cap)
        m_new = jnp.maximum(m, jnp.max(jnp.where(mask[:, None, None], logits, MASKED), axis=-1))
        p = jnp.where(mask[:, None, None], jnp.exp(logits - m_new[..., None]), 0.0)  # B K G S
        rescale = jnp.exp(m - m_new)
        acc = acc * rescale[..., None] + jnp.einsum("BKGS,BKSH->BKGH", p.astype(q.dtype), values, preferred_element_type=jnp.float32)
        return m_new, l * rescale + jnp.sum(p, axis=-1), acc

    init = (jnp.full((B, K, G), MASKED), jnp.zeros((B, K, G)), jnp.zeros((B, K, G, H)))
    _, l, acc = jax.lax.fori_loop(0, count, body, init)
    return (acc / l[..., None]).astype(q.dtype)
