"""The plain-XLA int8 matmuls: the CPU path, the oracle the Pallas kernels are tested against.

Shapes: x [M K] activations, w [K N] int8 weights (or [N K] with `w_transposed`, as the tied
embedding is stored), per-row activation scales xs [M 1], per-output-channel weight scales ws [N].
Scales are float32 everywhere: a bf16 scale would add a 0.4% per-channel bias, larger than
the int8 rounding noise itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
INT8_MAX = 127


def quantize_rows(x: Array, k_axes: tuple[str, ...] = ()) -> tuple[Array, Array]:
    """Dynamic per-token (per-row) symmetric absmax quantization: x [M K] -> (int8 [M K], float32 scale [M 1]).

    An all-zero row gets scale 0 and int8 zeros (divides by 1, never by 0), so it dequantizes
    to exact zeros instead of NaN. Inside `shard_map` with K split over mesh axes `k_axes`, the
    absmax is taken over the whole row, so every shard quantizes as one device would.
    """
    x32 = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = (jax.lax.pmax(absmax, k_axes) if k_axes else absmax) / INT8_MAX
    q = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0))
    return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def contract(x: Array, w: Array, w_transposed: bool, acc_dtype: jnp.dtype) -> Array:
    """x [M K] . w ([K N], or [N K] when transposed) -> [M N] accumulated in `acc_dtype`."""
    dims = (((1,), (1 if w_transposed else 0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=acc_dtype)


def int8_matmul(xq: Array, wq: Array, *, w_transposed: bool = False) -> Array:
    """int8 x int8 -> exact int32 [M N] (|sum| <= 127^2 K: no overflow below K = 133,000)."""
    return contract(xq, wq, w_transposed, jnp.int32)


def w8a8(xq: Array, xs: Array, wq: Array, ws: Array, *, w_transposed: bool = False, out_dtype=jnp.float32) -> Array:
    """int8 activations and weights: int32 accumulation, then x row scale x weight column scale."""
    acc = int8_matmul(xq, wq, w_transposed=w_transposed).astype(jnp.float32)
    return (acc * xs * ws).astype(out_dtype)


def w8a16(x: Array, wq: Array, ws: Array, *, w_transposed: bool = False, out_dtype=jnp.float32) -> Array:
    """Float activations, int8 weights: the weight is converted (exactly) to x's dtype, the column scale applied after."""
    acc = contract(x, wq.astype(x.dtype), w_transposed, jnp.float32)
    return (acc * ws).astype(out_dtype)
