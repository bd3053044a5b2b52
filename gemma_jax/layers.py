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

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_jax.kernels import int8_einsum, split_of, w8a8_matmul, w8a16_matmul

Array = jax.Array


class Einsum(nn.Module):
    """A weight of `shape` (logical `axes`) contracted with the input by an einsum equation."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    param_dtype: jnp.dtype = jnp.float32
    quant: str | None = None  # "w8a8" / "w8a16": create int8 params at init; activation mode at apply

    @nn.compact
    def __call__(self, eqn: str, x: Array) -> Array:
        x_dims, w_dims = eqn.split("->")[0].split(",")
        fan_in = tuple(i for i, d in enumerate(w_dims) if d in x_dims)  # contracted weight axes
        fan_out = tuple(i for i in range(len(w_dims)) if i not in fan_in)
        if self.quant is not None or self.has_variable("params", "scale"):
            # Init values are placeholders (quantize a float model instead); they give shapes and axes.
            w = self.param("w", nn.with_logical_partitioning(nn.initializers.zeros, self.axes), self.shape, jnp.int8)
            out_axes, out_shape = tuple(self.axes[i] for i in fan_out), tuple(self.shape[i] for i in fan_out)
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, out_axes), out_shape, jnp.float32)
            return int8_einsum(eqn, x, w, scale, scheme=_scheme(self.quant), w_axes=self.axes)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=fan_in, out_axis=fan_out)
        w = self.param("w", nn.with_logical_partitioning(init, self.axes), self.shape, self.param_dtype)
        n = len(fan_in)
        if n > 1 and fan_in == tuple(range(n)) and x_dims.endswith(w_dims[:n]):
            # Several contracted axes leading the weight (attention's output projection, NHD): contract
            # them as one. Otherwise XLA may permute the whole weight, every call, to suit x's layout.
            x, w = x.reshape(*x.shape[:-n], -1), w.reshape(-1, *w.shape[n:])
            eqn = f"{x_dims[:-n]}Z,Z{w_dims[n:]}->{eqn.split('->')[1]}"
        return jnp.einsum(eqn, x, w.astype(x.dtype))


class Embedder(nn.Module):
    """Token embedding [V D], scaled by sqrt(D) on the way in and tied as the output head."""

    vocab_size: int
    embed_dim: int
    param_dtype: jnp.dtype = jnp.float32
    quant: str | None = None  # int8 rows with per-row scales (see the module docstring)

    def setup(self) -> None:
        shape = (self.vocab_size, self.embed_dim)
        if self.quant is not None or self.has_variable("params", "scale"):
            zeros, ones = nn.initializers.zeros, nn.initializers.ones  # placeholders, as in Einsum
            self.embedding = self.param("embedding", nn.with_logical_partitioning(zeros, ("vocab", "embed")), shape, jnp.int8)
            self.scale = self.param("scale", nn.with_logical_partitioning(ones, ("vocab",)), shape[:1], jnp.float32)
            return
        std_normal_rows = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)  # ~1/sqrt(D)
        init = nn.with_logical_partitioning(std_normal_rows, ("vocab", "embed"))
        self.embedding = self.param("embedding", init, shape, self.param_dtype)

    def encode(self, tokens: Array, dtype: jnp.dtype) -> Array:
        """[B T] ids -> [B T D]. sqrt(D) is rounded to the parameter dtype first, as in training."""
        scale = jnp.asarray(self.embed_dim**0.5, self.param_dtype).astype(dtype)
        rows = jnp.take(self.embedding, tokens, axis=0)
        if self.embedding.dtype == jnp.int8:  # dequantize the gathered rows only
            rows = rows.astype(jnp.float32) * jnp.take(self.scale, tokens, axis=0)[..., None]
        return rows.astype(dtype) * scale

    def decode(self, x: Array) -> Array:
        """[... D] -> float32 logits [... V]."""
        if self.embedding.dtype == jnp.int8:  # the [V D] table is the transposed int8 weight of the head
            matmul = w8a8_matmul if _scheme(self.quant) == "w8a8" else w8a16_matmul
            rows = x.reshape(-1, self.embed_dim)
            split = split_of(("vocab", "embed"), self.embedding.shape, (1,), rows.shape[0])
            logits = matmul(rows, self.embedding, self.scale, w_transposed=True, out_dtype=jnp.float32, split=split)
            return logits.reshape(*x.shape[:-1], self.vocab_size)
        table = self.embedding.astype(x.dtype)
        if x.ndim == 2 and jax.default_backend() == "cpu":  # decode: [B D] rows
            # XLA:CPU runs this matmul up to 2x faster into a [V B] result than into [B V] (the
            # barrier keeps it from folding the transpose back into the matmul).
            logits = jnp.einsum("VD,BD->VB", table, x, preferred_element_type=jnp.float32)
            return jax.lax.optimization_barrier(logits).T
        return jnp.einsum("...D,VD->...V", x, table, preferred_element_type=jnp.float32)


def _scheme(quant: str | None) -> str:
    """The activation mode of int8 weights: weight-only unless "w8a8" is asked for."""
    if quant not in (None, "w8a8", "w8a16"):
        raise ValueError(f"unknown quant {quant!r}; choose 'w8a8', 'w8a16' or None")
    return quant or "w8a16"


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + scale), in float32 then cast back (the stored scale is zero-centred)."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), x.shape[-1:], self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


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
