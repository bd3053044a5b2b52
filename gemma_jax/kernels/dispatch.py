"""W8A8 / W8A16 matmuls with float activations in and out: backend choice and gradients.

Backends: "xla" (`reference`, any device; GSPMD partitions it), "tpu" (Mosaic kernels) and
"gpu" (Triton kernels), chosen by the caller's `Kernels` value (see `kernels/backend.py`: its
platform defaults, interpret mode for CPU tests, and why the choice is never global state).

On a mesh (a multi-device `Kernels.layout`), a `pallas_call` is opaque to GSPMD,
which would gather whole weights onto every device; so Pallas backends run per shard under
`shard_map` (see `Split`): tensor-parallel projections multiply their local weight blocks and
add partial sums with one `psum`, as GSPMD would. Layouts a `Split` cannot express take the
XLA path.

Gradients (for fine-tuning on a frozen int8 base, e.g. adapters): a custom VJP whose
backward pass is plain XLA. dx = (g * ws) . wqᵀ — for W8A8 this is the straight-through
estimator, treating the activation rounding as identity. The weight-scale gradient is exact
(XLA drops it when unused); int8 weights get none.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from gemma_jax.kernels import gpu, reference, tpu
from gemma_jax.kernels.backend import Kernels
from gemma_jax.sharding import Layout

Array = jax.Array
@dataclasses.dataclass(frozen=True)
class Split:
    """Where a matmul runs on a mesh, per shard: the mesh axes of x's rows (m), of the contraction (k)
    and of the output columns (n). Each device multiplies its blocks; partial sums over k are added
    (`psum`), and W8A8 takes each row's absmax over all of k (`pmax`) so every shard quantizes alike."""

    mesh: Mesh
    m: tuple[str, ...]
    k: tuple[str, ...]
    n: tuple[str, ...]


def split_of(
    w_axes: Sequence[str | None], w_shape: Sequence[int], contracted: Sequence[int], rows: int, layout: Layout | None
) -> Split | None:
    """The `Split` of an int8 weight (logical `w_axes`, `contracted` dims) times `rows` tokens on a multi-device
    `layout`; None without one, or when a flattened dim's mesh split is not one contiguous
    block (a sharded dim that is not the first of its group), which only GSPMD (the XLA path) can run.

    Mesh axes that split the rows are dropped from the weight (gathered first, as FSDP does).
    """
    if layout is None or layout.mesh.size == 1:
        return None
    spec = tuple(layout.spec(w_axes, w_shape))
    m = _names(layout.spec(("act_batch",), (rows,))[0])
    groups = []
    for dims in (tuple(contracted), tuple(i for i in range(len(w_shape)) if i not in contracted)):
        if any(spec[i] is not None for i in dims[1:]):
            return None
        groups.append(tuple(a for a in _names(spec[dims[0]]) if a not in m))
    k, n = groups
    return Split(layout.mesh, m, k, tuple(a for a in n if a not in k))


def _names(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _spec(*dims: tuple[str, ...]) -> PartitionSpec:
    return PartitionSpec(*(d or None for d in dims))


@dataclasses.dataclass(frozen=True)
class _Call:
    """The static part of a call (hashable: a custom_vjp non-differentiable argument)."""

    w8a8: bool  # quantize x per row (else W8A16: x stays float)
    backend: str
    w_transposed: bool
    out_dtype: Any
    blocks: Any
    interpret: bool
    split: Split | None  # run per shard under shard_map (Pallas backends on a mesh)

    def __call__(self, x: Array, wq: Array, ws: Array) -> Array:
        if self.split is None:
            return self._local(x, wq, ws)
        m, k, n = self.split.m, self.split.k, self.split.n
        local = jax.shard_map(
            functools.partial(self._local, k_axes=k), mesh=self.split.mesh, check_vma=False,
            in_specs=(_spec(m, k), _spec(n, k) if self.w_transposed else _spec(k, n), _spec(n)), out_specs=_spec(m, n),
        )  # fmt: skip
        return local(x, wq, ws)

    def _local(self, x: Array, wq: Array, ws: Array, k_axes: tuple[str, ...] = ()) -> Array:
        xs = None
        if self.w8a8:
            x, xs = reference.quantize_rows(x, k_axes)
        out_dtype = jnp.float32 if k_axes else self.out_dtype  # partial sums stay float32 until added
        if self.backend == "xla":
            y = (reference.w8a8(x, xs, wq, ws, w_transposed=self.w_transposed, out_dtype=out_dtype) if self.w8a8
                 else reference.w8a16(x, wq, ws, w_transposed=self.w_transposed, out_dtype=out_dtype))  # fmt: skip
        else:
            kernels = tpu if self.backend == "tpu" else gpu
            y = kernels.matmul(x, wq, xs, ws, w_transposed=self.w_transposed, out_dtype=out_dtype, blocks=self.blocks,
                               interpret=self.interpret)  # fmt: skip
        return jax.lax.psum(y, k_axes).astype(self.out_dtype) if k_axes else y


def w8a8_matmul(
    x: Array, wq: Array, ws: Array, *, w_transposed: bool = False, out_dtype=None, kernels: Kernels = Kernels(),
    blocks=None, split: Split | None = None,
) -> Array:  # fmt: skip
    """x [M K] float -> [M N] (x's dtype unless `out_dtype`): x quantized per row, int8 x int8 -> int32, rescaled.

    On a mesh, `split` (see `split_of`) runs a Pallas backend per shard; without one it falls back to XLA.
    """
    return _int8(_call(True, x, w_transposed, out_dtype, kernels, blocks, split), x, wq, ws)


def w8a16_matmul(
    x: Array, wq: Array, ws: Array, *, w_transposed: bool = False, out_dtype=None, kernels: Kernels = Kernels(),
    blocks=None, split: Split | None = None,
) -> Array:  # fmt: skip
    """x [M K] float -> [M N]: weight-only int8, dequantized inside the kernel, float accumulation."""
    return _int8(_call(False, x, w_transposed, out_dtype, kernels, blocks, split), x, wq, ws)


def _call(w8a8: bool, x: Array, w_transposed: bool, out_dtype, kernels: Kernels, blocks, split: Split | None) -> _Call:
    name = kernels.int8
    if kernels.mesh_layout is not None and (name == "xla" or split is None):
        name, split = "xla", None  # GSPMD partitions the XLA path itself; a pallas_call is opaque to it
    return _Call(w8a8, name, w_transposed, jnp.dtype(out_dtype or x.dtype), blocks, kernels.interpret, split)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _int8(call: _Call, x: Array, wq: Array, ws: Array) -> Array:
    return call(x, wq, ws)


def _fwd(call, x, wq, ws):
    return _int8(call, x, wq, ws), (x, wq, ws)


def _bwd(call, residuals, g):
    x, wq, ws = residuals
    if call.w8a8:
        xq, xs = reference.quantize_rows(x)
        unscaled = reference.int8_matmul(xq, wq, w_transposed=call.w_transposed).astype(jnp.float32) * xs
    else:
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


_int8.defvjp(_fwd, _bwd)
