"""Building blocks of the Gemma decoder: projections, RMSNorm, rotary embedding, soft-cap.

Every parameter is created with logical axis names (see `sharding/rules.py` for how they map
onto a device mesh), and every projection in the model goes through `Einsum`, the one place
the int8 matmuls (`gemma_jax.kernels`) are swapped in.

Quantized weights (made by `gemma_jax.quant.quantize_params`) keep the float layout and name
(`.../w`, `embedder/embedding`) as int8 and add a float32 `scale` beside them, named by the
weight's output axes. A module runs int8 when its params hold a `scale` (apply) or `quant` is
set (init). `quant` also picks the activation mode: "w8a8" quantizes activations per token;
anything else runs weight-only ("w8a16"), so int8 params run unchanged through code that does
not pass `quant` at all.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_jax.kernels import Kernels, int8_einsum, projection_dims

Array = jax.Array


class Einsum(nn.Module):
    """A weight of `shape` (logical `axes`), stored [out..., in...], contracted with x by a projection
    equation such as "BTD,NHD->BTNH" (see `kernels.projection_dims`)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    param_dtype: jnp.dtype = jnp.float32
    quant: str | None = None  # "w8a8" / "w8a16": create int8 params at init; activation mode at apply
    kernels: Kernels = Kernels()  # which int8 backend, on which mesh layout

    @nn.compact
    def __call__(self, eqn: str, x: Array) -> Array:
        n = projection_dims(eqn)[3]
        fan_out, fan_in = tuple(range(len(self.shape) - n)), tuple(range(len(self.shape) - n, len(self.shape)))
        if self.quant is not None or self.has_variable("params", "scale"):
            # Init values are placeholders (quantize a float model instead); they give shapes and axes.
            w = self.param("w", nn.with_logical_partitioning(nn.initializers.zeros, self.axes), self.shape, jnp.int8)
            out_axes, out_shape = self.axes[: len(fan_out)], self.shape[: len(fan_out)]
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, out_axes), out_shape, jnp.float32)
            return int8_einsum(eqn, x, w, scale, scheme=_scheme(self.quant), w_axes=self.axes, kernels=self.kernels)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=fan_in, out_axis=fan_out)
        w = self.param("w", nn.with_logical_partitioning(init, self.axes), self.shape, self.param_dtype)
        return project(eqn, x, w.astype(x.dtype), self.kernels)


# Up to this many rows (decode batches), XLA:CPU runs a projection faster as w . xᵀ into an
# [out rows] result than as x . wᵀ: measured here at 16 rows, 640->2048 in 488 vs 1089 us,
# 2048->640 in 367 vs 903 us, and the tied head [262144 640] in 53 vs 92 ms. At 128 rows and
# more (prefill) both orders run alike.
_WEIGHT_MAJOR_ROWS = 64


def project(eqn: str, x: Array, w: Array, kernels: Kernels, **kwargs) -> Array:
    """A float projection (see `Einsum`): `jnp.einsum(eqn, x, w)`, ordered for the backend on CPU."""
    x_dims, w_dims, out_dims, n = projection_dims(eqn)
    if n > 1:  # contract one merged dim: otherwise XLA may relayout the whole weight to suit x, every call
        z = next(c for c in "ZYXW" if c not in eqn)
        x, w = x.reshape(*x.shape[: x.ndim - n], -1), w.reshape(*w.shape[: w.ndim - n], -1)
        x_dims, w_dims = x_dims[: len(x_dims) - n] + z, w_dims[: len(w_dims) - n] + z
        eqn, n = f"{x_dims},{w_dims}->{out_dims}", 1
    if not kernels.cpu_unsharded or math.prod(x.shape[: x.ndim - n]) > _WEIGHT_MAJOR_ROWS:
        return jnp.einsum(eqn, x, w, **kwargs)
    w_out, x_out = w_dims[: len(w_dims) - n], x_dims[: len(x_dims) - n]
    y = jnp.einsum(f"{w_dims},{x_dims}->{w_out}{x_out}", w, x, **kwargs)
    # The barrier keeps XLA from folding the transpose back into the matmul.
    return jnp.einsum(f"{w_out}{x_out}->{out_dims}", jax.lax.optimization_barrier(y))


class Embedder(nn.Module):
    """Token embedding [V D], scaled by sqrt(D) on the way in and tied as the output head."""

    vocab_size: int
    embed_dim: int
    param_dtype: jnp.dtype = jnp.float32
    quant: str | None = None  # int8 rows with per-row scales (see the module docstring)
    kernels: Kernels = Kernels()
    input_scale: float | None = None  # multiplies rows on the way in; None: sqrt(embed_dim)
    AXES = ("vocab", "embed")  # logical axes of the table (a constant, not a module field)

    def setup(self) -> None:
        shape = (self.vocab_size, self.embed_dim)
        if self.quant is not None or self.has_variable("params", "scale"):
            zeros, ones = nn.initializers.zeros, nn.initializers.ones  # placeholders, as in Einsum
            self.embedding = self.param("embedding", nn.with_logical_partitioning(zeros, self.AXES), shape, jnp.int8)
            self.scale = self.param("scale", nn.with_logical_partitioning(ones, ("vocab",)), shape[:1], jnp.float32)
            return
        std_normal_rows = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)  # ~1/sqrt(D)
        init = nn.with_logical_partitioning(std_normal_rows, self.AXES)
        self.embedding = self.param("embedding", init, shape, self.param_dtype)

    def encode(self, tokens: Array, dtype: jnp.dtype) -> Array:
        """[B T] ids -> [B T D]. sqrt(D) (or `input_scale`) is rounded to the parameter dtype first, as in training."""
        scale = jnp.asarray(self.embed_dim**0.5 if self.input_scale is None else self.input_scale, self.param_dtype).astype(dtype)
        rows = jnp.take(self.embedding, tokens, axis=0)
        if self.embedding.dtype == jnp.int8:  # dequantize the gathered rows only
            rows = rows.astype(jnp.float32) * jnp.take(self.scale, tokens, axis=0)[..., None]
        return rows.astype(dtype) * scale

    def decode(self, x: Array) -> Array:
        """[... D] -> float32 logits [... V]."""
        if self.embedding.dtype == jnp.int8:
            return int8_einsum("...D,VD->...V", x, self.embedding, self.scale, scheme=_scheme(self.quant),
                               w_axes=self.AXES, out_dtype=jnp.float32, kernels=self.kernels)  # fmt: skip
        return project("...D,VD->...V", x, self.embedding.astype(x.dtype), self.kernels, preferred_element_type=jnp.float32)


def _scheme(quant: str | None) -> str:
    """The activation mode of int8 weights: weight-only unless "w8a8" is asked for."""
    if quant not in (None, "w8a8", "w8a16"):
        raise ValueError(f"unknown quant {quant!r}; choose 'w8a8', 'w8a16' or None")
    return quant or "w8a16"


def rms_normalize(x: Array, eps: float) -> Array:
    """x / rms(x) over the last axis, in float32 (callers scale it and cast back)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + scale), in float32 then cast back (the stored scale is zero-centred)."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), x.shape[-1:], self.param_dtype)
        return (rms_normalize(x, self.eps) * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class PlainRMSNorm(nn.Module):
    """x / rms(x) * scale, in float32 then cast back: the stored scale multiplies as is (ones at init),
    as in Gemma 3n, whose checkpoints hold the full scale rather than Gemma 1-3's offset from one."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), x.shape[-1:], self.param_dtype)
        return (rms_normalize(x, self.eps) * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x: Array, positions: Array, base: float, scale: float = 1.0) -> Array:
    """Rotary embedding, split-half convention, with linear position scaling. x: [B T N H], positions: [B T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / base ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1]) / scale  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # B T H/2
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)  # B T 1 H/2
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def soft_cap(x: Array, cap: float | None) -> Array:
    """cap * tanh(x / cap): bounds logits smoothly to (-cap, cap); identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


# Rematerialisation trades compute for activation memory in training: "none" keeps every
# activation for the backward pass; "block" keeps only each layer's input and recomputes the
# layer; "dots" also keeps the projections' outputs (matmuls without batch dims) and recomputes
# attention and the elementwise ops.
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@functools.cache
def rematerialized(block: type[nn.Module], remat: str, static_argnum: int) -> type[nn.Module]:
    """A decoder block class wrapped in `nn.remat` under policy `remat` (unwrapped for "none"); argument
    `static_argnum` of its call (the `fresh_cache` flag) stays static."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {', '.join(REMAT_POLICIES)}")
    return block if remat == "none" else nn.remat(block, static_argnums=(static_argnum,), policy=REMAT_POLICIES[remat])
