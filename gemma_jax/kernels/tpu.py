"""int8 matmul kernels for TPU (Pallas / Mosaic): W8A8, W8A16 and the raw int32 product.

Grid (M blocks, N blocks, K blocks), K innermost: each (i, j) output tile accumulates its K
slices in a VMEM scratch (int32 for int8 x int8, float32 for W8A16) and applies the scales
once, at the last K step, so scaling costs nothing per K step. W8A16 converts each int8
weight tile to the activation dtype inside VMEM, so HBM traffic is the int8 bytes.

Mosaic needs each block's last two dims to be multiples of the (sublane, 128) tiling or the
whole dimension, and a K block that overruns K would add garbage into the sum. So blocks
are chosen to divide the (padded) dims: M is padded to a multiple of 32 (int8 sublane
tiling; decode's M = 1 becomes one 32-row tile), K and N use the largest multiple of 128
that divides them (every Gemma projection is a multiple of 128: no weight copy); only odd
K/N (tiny test models) are zero-padded per call. Zero padding is exact: padded K adds 0,
padded rows/cols are cut off.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gemma_jax.kernels.reference import contract

Array = jax.Array
_LANE, _SUBLANE_INT8 = 128, 32
_DECODE_M = 128  # at or below this many (padded) rows, blocks favour long weight tiles
_MIN_VMEM_LIMIT = 32 * 2**20


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes (rows of x, contraction, output columns). Targets: the planner shrinks them to fit each shape."""

    bm: int
    bk: int
    bn: int


PREFILL = Blocks(bm=512, bk=1024, bn=1024)  # ~80-90% of MXU peak for bf16 on v5e (Pallas TPU matmul guide)
DECODE = Blocks(bm=_DECODE_M, bk=1024, bn=2048)  # memory bound: 2 MiB int8 weight tiles keep the DMA engine busy


def default_blocks(m: int) -> Blocks:
    """Block targets by regime: decode (small M) streams weights; prefill (large M) is MXU bound."""
    return DECODE if m <= _DECODE_M else PREFILL


def _fit(dim: int, target: int, align: int) -> tuple[int, int]:
    """(block, padded dim): the largest multiple of `align` <= target dividing dim, else the whole
    dim when it fits one block, else dim zero-padded to a multiple of `align`."""
    if dim % align == 0:
        return max(b for b in range(align, min(target, dim) + 1, align) if dim % b == 0), dim
    if dim <= target:
        return dim, dim
    return _fit(-(-dim // align) * align, target, align)


def _fit_rows(m: int, target: int) -> tuple[int, int]:
    """(bm, padded M): one tile when M fits, else the tile size in {target, /2, /4} wasting the fewest padded rows."""
    m32 = -(-m // _SUBLANE_INT8) * _SUBLANE_INT8
    if m32 <= target:
        return m32, m32
    sizes = [b for b in (target, target // 2, target // 4) if b >= _SUBLANE_INT8 and b % _SUBLANE_INT8 == 0]
    best = min(sizes, key=lambda b: (-(-m // b) * b, -b))
    return best, -(-m // best) * best


def _pad(x: Array, shape: tuple[int, ...]) -> Array:
    if x.shape == tuple(shape):
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def _kernel(x_ref, w_ref, *refs, w_transposed: bool):
    """One (i, j, k) step. refs = (*scale refs, out, acc): scales are (xs [bm 1], ws [1 bn]) for
    W8A8, (ws,) for W8A16, () for the raw int32 product."""
    *scale_refs, o_ref, acc_ref = refs
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x, w = x_ref[...], w_ref[...]
    if w.dtype != x.dtype:  # W8A16: dequantize the tile in VMEM (exact: |q| <= 127 fits bf16)
        w = w.astype(x.dtype)
    acc_ref[...] += contract(x, w, w_transposed, acc_ref.dtype)

    @pl.when(k == pl.num_programs(2) - 1)
    def _finish():
        out = acc_ref[...]
        if scale_refs:
            out = out.astype(jnp.float32)
            for s in scale_refs:
                out = out * s[...]
        o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("w_transposed", "out_dtype", "blocks", "interpret"))
def matmul(
    x: Array,
    wq: Array,
    xs: Array | None = None,
    ws: Array | None = None,
    *,
    w_transposed: bool = False,
    out_dtype=None,
    blocks: Blocks | None = None,
    interpret: bool = False,
) -> Array:
    """x [M K] (int8 for W8A8 / raw, float for W8A16) times int8 wq [K N] ([N K] if transposed).

    With xs [M 1] and ws [N]: W8A8 -> out_dtype. With ws only: W8A16 -> out_dtype. With neither:
    the exact int32 product (out_dtype ignored). `interpret` runs the kernel on CPU.
    """
    M, K = x.shape
    N = wq.shape[0] if w_transposed else wq.shape[1]
    target = blocks or default_blocks(M)
    bm, Mp = _fit_rows(M, target.bm)
    bk, Kp = _fit(K, target.bk, _LANE)
    bn, Np = _fit(N, target.bn, _LANE)
    acc_dtype = jnp.int32 if x.dtype == jnp.int8 else jnp.float32
    out_dtype = jnp.int32 if ws is None else jnp.dtype(out_dtype or jnp.float32)

    operands = [_pad(x, (Mp, Kp)), _pad(wq, (Np, Kp) if w_transposed else (Kp, Np))]
    in_specs = [
        pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
        pl.BlockSpec((bn, bk), lambda i, j, k: (j, k)) if w_transposed else pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
    ]
    if xs is not None:
        operands.append(_pad(xs.astype(jnp.float32), (Mp, 1)))
        in_specs.append(pl.BlockSpec((bm, 1), lambda i, j, k: (i, 0)))
    if ws is not None:
        operands.append(_pad(ws.astype(jnp.float32).reshape(1, N), (1, Np)))
        in_specs.append(pl.BlockSpec((1, bn), lambda i, j, k: (0, j)))

    vmem = 2 * (bm * bk * x.dtype.itemsize + bk * bn + bm * bn * jnp.dtype(out_dtype).itemsize) + 4 * bm * bn
    vmem += bk * bn * x.dtype.itemsize if acc_dtype == jnp.float32 else 0  # W8A16's dequantized tile
    out = pl.pallas_call(
        functools.partial(_kernel, w_transposed=w_transposed),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        grid=(Mp // bm, Np // bn, Kp // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), acc_dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=max(_MIN_VMEM_LIMIT, 2 * vmem),
        ),
        interpret=interpret,
        name="w8a8_matmul" if xs is not None else "w8a16_matmul" if ws is not None else "int8_matmul",
    )(*operands)
    return out[:M, :N]
