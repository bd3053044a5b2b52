"""Projection equations, and an einsum over an int8 weight run as one 2-D int8 matmul.

Every Gemma weight is stored [out..., in...], as torch `Linear` and Hugging Face store it: a
projection such as "BTD,NHD->BTNH" contracts x's trailing dims with the weight's trailing dims
(in the same order), and its output is x's other dims followed by the weight's other dims. That
is the matmul x [M K] . w [N K]ᵀ with free reshapes (no transposes, no weight copies), float or
int8. Anything else is rejected rather than silently transposing a weight on every call.
"""

from __future__ import annotations

import math

import jax

from gemma_jax.kernels.backend import Kernels
from gemma_jax.kernels.dispatch import split_of, w8a8_matmul, w8a16_matmul

Array = jax.Array
SCHEMES = ("w8a8", "w8a16")


def projection_dims(eqn: str) -> tuple[str, str, str, int]:
    """(x dims, weight dims, output dims, number of contracted dims) of a projection equation, checked."""
    inputs, out_dims = eqn.replace(" ", "").split("->")
    x_dims, w_dims = inputs.split(",")
    n = sum(d in x_dims for d in w_dims)
    kept = w_dims[: len(w_dims) - n]
    if not n or not x_dims.endswith(w_dims[len(kept) :]) or out_dims != x_dims[: len(x_dims) - n] + kept:
        raise ValueError(
            f"projection {eqn!r}: needs the weight's contracted dims last, matching x's last dims, "
            "and output = x's other dims then the weight's"
        )
    return x_dims, w_dims, out_dims, n


def int8_einsum(
    eqn: str, x: Array, wq: Array, ws: Array, *, scheme: str, w_axes: tuple[str, ...] | None = None, out_dtype=None,
    kernels: Kernels = Kernels(),
) -> Array:  # fmt: skip
    """`eqn` applied to x and the int8 weight wq (scales ws over its output dims), in `out_dtype` (default x's).

    scheme "w8a8" also quantizes x per token (all of x's leading dims form the token axis M);
    "w8a16" keeps x in its float dtype. `kernels` picks the backend; `w_axes` (wq's logical axes)
    lets a Pallas backend run per shard on `kernels.layout` (see `dispatch.split_of`).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    n = projection_dims(eqn)[3]
    out = wq.shape[: wq.ndim - n]
    if ws.shape != out:
        raise ValueError(f"int8 einsum {eqn!r}: scale shape {ws.shape} is not the weight's output shape {out}")
    K, N, M = math.prod(wq.shape[len(out) :]), math.prod(out), math.prod(x.shape[: x.ndim - n])
    matmul = w8a8_matmul if scheme == "w8a8" else w8a16_matmul
    split = None if w_axes is None else split_of(w_axes, wq.shape, tuple(range(len(out), wq.ndim)), M, kernels.layout)
    y = matmul(x.reshape(M, K), wq.reshape(N, K), ws.reshape(N), w_transposed=True, out_dtype=out_dtype, kernels=kernels,
               split=split)  # [M N]  # fmt: skip
    return y.reshape(x.shape[: x.ndim - n] + out)
