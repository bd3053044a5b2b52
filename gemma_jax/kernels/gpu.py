"""int8 matmul kernels for NVIDIA GPUs (Pallas / Triton): W8A8, W8A16 and the raw int32 product.

Grid (M blocks, N blocks); each program loops over K in `bk` slices, loading tiles with
masks, so any M, K, N works without padding copies (Triton tiles must be powers of two and
at least 16 for `tl.dot`). int8 x int8 accumulates in int32 on the tensor cores (IMMA /
wgmma); W8A16 converts the int8 weight tile to the activation dtype in registers. Scales are
applied once after the K loop.

Not yet measured on a GPU (none was lent while this was written): `benchmarks/int8_matmul.py
--backends xla,gpu` compares it with XLA's own int8 path (cuBLASLt), which is why the
dispatcher's GPU default stays "xla" until a measurement says otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gemma_jax.kernels.reference import contract

Array = jax.Array
_DECODE_M = 16


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
    """Tile sizes (powers of two, >= 16) and Triton launch parameters."""

    bm: int
    bk: int
    bn: int
    num_warps: int = 4
    num_stages: int = 3


PREFILL = GpuBlocks(bm=128, bk=128, bn=128, num_warps=8, num_stages=3)
DECODE = GpuBlocks(bm=16, bk=256, bn=64, num_warps=4, num_stages=4)  # narrow N tiles: enough programs to fill the SMs


def default_blocks(m: int) -> GpuBlocks:
    return DECODE if m <= _DECODE_M else PREFILL


def _kernel(x_ref, w_ref, *refs, blocks: GpuBlocks, w_transposed: bool, dims: tuple[int, int, int]):
    """One (i, j) output tile. refs = (*scale refs, out): scales as in `matmul`, flattened to 1-D."""
    *scale_refs, o_ref = refs
    M, K, N = dims
    bm, bk, bn = blocks.bm, blocks.bk, blocks.bn
    i, j = pl.program_id(0), pl.program_id(1)
    rows, cols = i * bm + jnp.arange(bm), j * bn + jnp.arange(bn)
    row_ok, col_ok = rows < M, cols < N
    acc_dtype = jnp.int32 if x_ref.dtype == jnp.int8 else jnp.float32

    def step(k, acc):
        ks = k * bk + jnp.arange(bk)
        k_ok = ks < K
        x = plgpu.load(x_ref.at[pl.ds(i * bm, bm), pl.ds(k * bk, bk)], mask=row_ok[:, None] & k_ok[None, :], other=0)
        if w_transposed:
            w = plgpu.load(w_ref.at[pl.ds(j * bn, bn), pl.ds(k * bk, bk)], mask=col_ok[:, None] & k_ok[None, :], other=0)
        else:
            w = plgpu.load(w_ref.at[pl.ds(k * bk, bk), pl.ds(j * bn, bn)], mask=k_ok[:, None] & col_ok[None, :], other=0)
        if w.dtype != x.dtype:  # W8A16: dequantize in registers (exact)
            w = w.astype(x.dtype)
        return acc + contract(x, w, w_transposed, acc_dtype)

    out = jax.lax.fori_loop(0, pl.cdiv(K, bk), step, jnp.zeros((bm, bn), acc_dtype))
    if scale_refs:  # (xs [M], ws [N]) for W8A8, (ws,) for W8A16
        out = out.astype(jnp.float32)
        if len(scale_refs) == 2:
            out = out * plgpu.load(scale_refs[0].at[pl.ds(i * bm, bm)], mask=row_ok, other=0.0)[:, None]
        out = out * plgpu.load(scale_refs[-1].at[pl.ds(j * bn, bn)], mask=col_ok, other=0.0)[None, :]
    window = o_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)]
    plgpu.store(window, out.astype(o_ref.dtype), mask=row_ok[:, None] & col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("w_transposed", "out_dtype", "blocks", "interpret"))
def matmul(
    x: Array,
    wq: Array,
    xs: Array | None = None,
    ws: Array | None = None,
    *,
    w_transposed: bool = False,
    out_dtype=None,
    blocks: GpuBlocks | None = None,
    interpret: bool = False,
) -> Array:
    """Same contract as `tpu.matmul`: x [M K], int8 wq [K N] ([N K] if transposed), optional xs [M 1], ws [N]."""
    M, K = x.shape
    N = wq.shape[0] if w_transposed else wq.shape[1]
    blocks = blocks or default_blocks(M)
    scales = [s.astype(jnp.float32).reshape(-1) for s in (xs, ws) if s is not None]
    out_dtype = jnp.int32 if ws is None else jnp.dtype(out_dtype or jnp.float32)
    return pl.pallas_call(
        functools.partial(_kernel, blocks=blocks, w_transposed=w_transposed, dims=(M, K, N)),
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        grid=(pl.cdiv(M, blocks.bm), pl.cdiv(N, blocks.bn)),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="int8_matmul_gpu",
    )(x, wq, *scales)
