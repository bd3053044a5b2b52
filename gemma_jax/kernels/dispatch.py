"""W8A8 / W8A16 matmuls with float activations in and out: backend choice and gradients.

Backends: "xla" (`reference`, any device; GSPMD partitions it), "tpu" (Mosaic kernels) and
"gpu" (Triton kernels). Pallas backends run in interpret mode when the default device is a
CPU, which is how the tests exercise them (`use_backend(..., interpret=False)` lowers the real
kernels instead, for `jax.export` to a TPU or GPU). The default is "tpu" on TPU v5e and later, "xla"
elsewhere: on TPU v4 (no int8 MXU speed-up), on GPU until the Triton kernel is measured
against XLA's cuBLASLt int8 path, on CPU, and whenever a multi-device sharding layout is
active (a `pallas_call` is opaque to GSPMD, which would gather whole weights onto every
device). Override with `use_backend(...)`, the `GEMMA_JAX_INT8_BACKEND` variable or the
`backend=` argument. The choice is read when a function is traced: set it before the first
call of a jitted function, since jit does not retrace when it changes.

Gradients (for fine-tuning on a frozen int8 base, e.g. adapters): a custom VJP whose
backward pass is plain XLA. dx = (g * ws) . wqᵀ — for W8A8 this is the straight-through
estimator, treating the activation rounding as identity. The weight-scale gradient is exact
(XLA drops it when unused); int8 weights get none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from gemma_jax.kernels import gpu, reference, tpu

Array = jax.Array
BACKENDS = ("xla", "tpu", "gpu")
_ENV = "GEMMA_JAX_INT8_BACKEND"
_override: list[tuple[str, bool | None]] = []  # (backend, interpret) of the innermost `use_backend`


@contextlib.contextmanager
def use_backend(name: str, *, interpret: bool | None = None) -> Iterator[None]:
    """Trace int8 matmuls inside this block with backend `name` ("xla", "tpu" or "gpu").

    `interpret` forces Pallas interpret mode on or off (default: on exactly when the default
    device is a CPU); off on a CPU is for `jax.export` to a TPU or GPU target.
    """
    _override.append((_check(name), interpret))
    try:
        yield
    finally:
        _override.pop()


def resolve_backend(backend: str | None = None) -> str:
    """The backend a call will use: the argument, else `use_backend`, else the environment, else the platform default."""
    if backend is not None:
        return _check(backend)
    if _override:
        return _override[-1][0]
    if os.environ.get(_ENV):
        return _check(os.environ[_ENV])
    device = jax.devices()[0]
    return platform_default(device.platform, device.device_kind, _sharded())


def platform_default(platform: str, device_kind: str, sharded: bool) -> str:
    """Pallas on TPU v5e and later when one device runs the matmul; XLA everywhere else (see the module docstring)."""
    return "tpu" if platform == "tpu" and "v4" not in device_kind.lower() and not sharded else "xla"


def _interpret() -> bool:
    forced = _override[-1][1] if _override else None
    return jax.default_backend() == "cpu" if forced is None else forced


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown int8 backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def _sharded() -> bool:
    """Is a multi-device layout active (see `sharding.activate`)?"""
    from sharding import partition

    layout = getattr(partition._active, "layout", None)
    return layout is not None and layout.mesh.size > 1


@dataclasses.dataclass(frozen=True)
class _Call:
    """The static part of a call (hashable: a custom_vjp non-differentiable argument)."""

    backend: str
    w_transposed: bool
    out_dtype: Any
    blocks: Any
    interpret: bool

    def run(self, x: Array, wq: Array, xs: Array | None, ws: Array) -> Array:
        if self.backend == "xla":
            if xs is None:
                return reference.w8a16(x, wq, ws, w_transposed=self.w_transposed, out_dtype=self.out_dtype)
            return reference.w8a8(x, xs, wq, ws, w_transposed=self.w_transposed, out_dtype=self.out_dtype)
        kernels = tpu if self.backend == "tpu" else gpu
        return kernels.matmul(
            x, wq, xs, ws, w_transposed=self.w_transposed, out_dtype=self.out_dtype, blocks=self.blocks, interpret=self.interpret
        )


def w8a8_matmul(
    x: Array, wq: Array, ws: Array, *, w_transposed: bool = False, out_dtype=None, backend: str | None = None, blocks=None
) -> Array:
    """x [M K] float -> [M N] (x's dtype unless `out_dtype`): x quantized per row, int8 x int8 -> int32, rescaled."""
    call = _Call(resolve_backend(backend), w_transposed, jnp.dtype(out_dtype or x.dtype), blocks, _interpret())
    return _w8a8(call, x, wq, ws)


def w8a16_matmul(
    x: Array, wq: Array, ws: Array, *, w_transposed: bool = False, out_dtype=None, backend: str | None = None, blocks=None
) -> Array:
    """x [M K] float -> [M N]: weight-only int8, dequantized inside the kernel, float accumulation."""
    call = _Call(resolve_backend(backend), w_transposed, jnp.dtype(out_dtype or x.dtype), blocks, _interpret())
    return _w8a16(call, x, wq, ws)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _w8a8(call: _Call, x: Array, wq: Array, ws: Array) -> Array:
    xq, xs = reference.quantize_rows(x)
    return call.run(xq, wq, xs, ws)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _w8a16(call: _Call, x: Array, wq: Array, ws: Array) -> Array:
    return call.run(x, wq, None, ws)


def _fwd8(call, x, wq, ws):
    return _w8a8(call, x, wq, ws), (x, wq, ws)


def _fwd16(call, x, wq, ws):
    return _w8a16(call, x, wq, ws), (x, wq, ws)


def _bwd8(call, residuals, g):
    x, wq, ws = residuals
    xq, xs = reference.quantize_rows(x)
    unscaled = reference.int8_matmul(xq, wq, w_transposed=call.w_transposed).astype(jnp.float32) * xs
    return _input_grad(call, g, wq, ws, x.dtype), None, _scale_grad(g, unscaled, ws)


def _bwd16(call, residuals, g):
    x, wq, ws = residuals
    unscaled = reference.contract(x, wq.astype(x.dtype), call.w_transposed, jnp.float32)
    return _input_grad(call, g, wq, ws, x.dtype), None, _scale_grad(g, unscaled, ws)


def _input_grad(call: _Call, g: Array, wq: Array, ws: Array, dtype) -> Array:
    """dx [M K] = (g * ws) [M N] . wqᵀ in x's dtype (a float32 copy of a big weight would cost 4x its bytes)."""
    gs = (g.astype(jnp.float32) * ws.astype(jnp.float32)).astype(dtype)
    dims = (((1,), (0 if call.w_transposed else 1,)), ((), ()))
    return jax.lax.dot_general(gs, wq.astype(dtype), dims, preferred_element_type=jnp.float32).astype(dtype)


def _scale_grad(g: Array, unscaled: Array, ws: Array) -> Array:
    """dws [N] = sum over rows of g * (the product before the weight scale)."""
    return jnp.sum(g.astype(jnp.float32) * unscaled, axis=0).astype(ws.dtype)


_w8a8.defvjp(_fwd8, _bwd8)
_w8a16.defvjp(_fwd16, _bwd16)
