"""An einsum over an int8 weight, run as one 2-D int8 matmul.

The kernels are [M K] x [K N]; a projection such as "BTNH,NHD->BTD" is that matmul when the
weight's contracted dims lead (in the order x ends with) and the output is x's leading dims
followed by the weight's trailing ones. Every Gemma projection is laid out this way, so the
reshapes are free (no transposes, no weight copies). Anything else is rejected rather than
silently transposing a weight on every call.
"""

from __future__ import annotations

import math

import jax

from gemma_jax.kernels.dispatch import split_of, w8a8_matmul, w8a16_matmul

Array = jax.Array
SCHEMES = ("w8a8", "w8a16")


def int8_einsum(eqn: str, x: Array, wq: Array, ws: Array, *, scheme: str, w_axes: tuple[str, ...] | None = None) -> Array:
    """`eqn` applied to x and the int8 weight wq (scales ws over its output dims), in x's dtype.

    scheme "w8a8" also quantizes x per token (all of x's leading dims form the token axis M);
    "w8a16" keeps x in its float dtype. `w_axes` (wq's logical axes) lets a Pallas backend run
    per shard under a sharding layout (see `dispatch.split_of`).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    inputs, out_dims = eqn.replace(" ", "").split("->")
    x_dims, w_dims = inputs.split(",")
    n = sum(d in x_dims for d in w_dims)  # contracted dims
    contracted, kept = w_dims[:n], w_dims[n:]
    if not x_dims.endswith(contracted) or any(d in x_dims for d in kept) or out_dims != x_dims[: len(x_dims) - n] + kept:
        raise NotImplementedError(
            f"int8 einsum {eqn!r}: needs the weight's contracted dims first, matching x's last dims, "
            "and output = x's other dims then the weight's"
        )
    if ws.shape != wq.shape[n:]:
        raise ValueError(f"int8 einsum {eqn!r}: scale shape {ws.shape} is not the weight's output shape {wq.shape[n:]}")
    K, N = math.prod(wq.shape[:n]), math.prod(wq.shape[n:])
    matmul = w8a8_matmul if scheme == "w8a8" else w8a16_matmul
    M = math.prod(x.shape[: x.ndim - n])
    split = None if w_axes is None else split_of(w_axes, wq.shape, tuple(range(n)), M)
    y = matmul(x.reshape(M, K), wq.reshape(K, N), ws.reshape(N), split=split)  # [M N]
    return y.reshape(x.shape[: x.ndim - n] + wq.shape[n:])
