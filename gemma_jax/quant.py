"""Quantize a float Gemma param tree to int8: per-output-channel symmetric weights + float32 scales.

Every projection (attention q/k/v/o, MLP gate/up/down) and the tied embedding become int8.
The embedding is quantized per row (one scale per vocabulary entry), which is per output
channel of the tied head; it is a fifth of Gemma 2 2B and most of Gemma 3 270M, so leaving
it in bf16 would keep the tree well above half the bf16 bytes. Norm scales stay float.

The result is a plain pytree of arrays with the float tree's paths plus a `scale` beside each
int8 weight, e.g. `layer_0/attn/q/{w: int8 [N H D], scale: f32 [N H]}` and
`embedder/{embedding: int8 [V D], scale: f32 [V]}`; `model.param_axes(config, quant=...)`
gives its logical axes, so it shards, saves and restores (Orbax) like any float tree. Either
scheme's tree runs either way (`Transformer(..., quant=scheme)` picks the activation mode).

W8A8 with calibration tokens first applies SmoothQuant (Xiao et al., 2023): per-token int8
activations lose their small channels to a few outlier channels, so each input channel c of
a projection is divided by s_c = max|x_c|^α / max|W_c|^(1-α) and the weight row multiplied by
it — an exact rewrite of the float model that moves range from activations into weights.
In Gemma every division folds into an existing parameter: q/k/v and gate/up inputs into the
preceding RMSNorm's (1 + w), o's input into v's output channels (shared per KV group), down's
input into up's output channels. On the real Gemma 3 270M this halves W8A8's KL divergence
(see benchmarks/quant_quality.py). Smoothed norm scales are stored in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

from gemma_jax.kernels import SCHEMES
from gemma_jax.kernels.reference import INT8_MAX
from gemma_jax.layers import Einsum
from gemma_jax.models import Config, build, family_of, init_params

Array = jax.Array
ParamPath = tuple[str, ...]
SMOOTH_ALPHA = 0.7  # 0.5 (the paper's default) left W8A8 ~0.7 pp further from float on Gemma 3 270M
Factors = dict[ParamPath, tuple[Array, ...]]  # weight path -> factors broadcast against it, multiplied in


@functools.partial(jax.jit, static_argnames=("axes",))
def quantize_weight(w: Array, axes: tuple[int, ...], factors: tuple[Array, ...] = ()) -> tuple[Array, Array]:
    """Symmetric absmax int8 over the reduced `axes` (the contracted ones): (int8 like w, float32 scale over the rest).

    `factors` (SmoothQuant's) multiply w in float32 first, one leaf at a time, so a 27B model is
    never held in float32. An all-zero channel gets scale 0 and int8 zeros (no division by zero).
    """
    w32 = w.astype(jnp.float32)
    for f in factors:
        w32 = w32 * f
    scale = jnp.max(jnp.abs(w32), axis=axes, keepdims=True) / INT8_MAX
    q = jnp.clip(jnp.round(w32 / jnp.where(scale > 0, scale, 1.0)), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis=axes)


def quantize_params(
    config: Config, params: Any, scheme: str, *, calibration: np.ndarray | None = None, alpha: float = SMOOTH_ALPHA
) -> dict:
    """The int8 tree of a float param tree (see the module docstring). `scheme`: "w8a8" or "w8a16".

    `calibration` (W8A8 only): token ids [B T] of representative text, for SmoothQuant; without
    it W8A8 is plain per-token x per-channel int8.
    """
    factors, norms = smoothing(config, params, scheme, calibration, alpha)
    flat = flatten_dict(params)
    return unflatten_dict(dict(quantized_leaves(config, flat.__getitem__, scheme, factors, norms)))


def smoothing(
    config: Config, params: Any, scheme: str, calibration: np.ndarray | None, alpha: float = SMOOTH_ALPHA
) -> tuple[Factors, dict[ParamPath, Array]]:
    """SmoothQuant's (factors, norms) for `quantized_leaves`, from calibration tokens; none without them."""
    check_scheme(scheme, calibration is not None)
    if calibration is None:
        return {}, {}
    return smooth(config, params, input_absmax(config, params, calibration), alpha)


def quantized_leaves(
    config: Config, read: Callable[[ParamPath], Array], scheme: str, factors: Factors = {}, norms: Mapping = {}
) -> Iterator[tuple[ParamPath, Array]]:
    """(path, leaf) of the int8 tree, reading each float param once through `read(path)`: streams a checkpoint.

    Which leaves become int8, and each scale's shape, come from the model itself (its quantized
    init), so this follows the model's layers.
    """
    layout = quantized_layout(config, scheme)
    scales = {path: path[:-1] + ("scale",) for path, leaf in layout.items() if leaf.dtype == jnp.int8}
    for path, leaf in layout.items():
        if path in scales.values():
            continue  # written with its weight
        if path not in scales:
            yield path, norms.get(path, read(path))
            continue
        scale_path = scales[path]
        n = len(layout[scale_path].shape)  # output dims
        w = read(path)
        # Weights are [out..., in...] (the embedding's rows are the tied head's output channels).
        q, scale = quantize_weight(w, tuple(range(n, w.ndim)), factors.get(path, ()))
        yield path, q
        yield scale_path, scale


def quantized_layout(config: Config, scheme: str) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """Path -> shape and dtype of every leaf of the int8 tree (int8 weights, float32 scales, float norms)."""
    check_scheme(scheme)
    return flatten_dict(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), quant=scheme)))


def check_scheme(scheme: str, calibrated: bool = False) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if calibrated and scheme != "w8a8":
        raise ValueError("calibration (SmoothQuant) is for w8a8; w8a16 keeps activations in float")


def input_absmax(config: Config, params: Any, tokens: np.ndarray) -> dict[ParamPath, Array]:
    """max |x| per input channel of every projection over calibration tokens [B T] (one row per call).

    Keyed by module path, e.g. ("layer_0", "attn", "o") -> [N H]: the einsum's contracted dims.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"calibration tokens must be a [B, T] batch of ids with T >= 2, got shape {tokens.shape}")

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Einsum) and context.method_name == "__call__":
            eqn, x = args
            x_dims, w_dims = eqn.split("->")[0].split(",")
            kept = x.ndim - sum(d in x_dims for d in w_dims)  # x's leading (token) dims
            context.module.sow("intermediates", "absmax", jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(kept))))
        return next_fun(*args, **kwargs)

    @jax.jit
    def run(params, row):  # row [1 T]
        positions = jnp.arange(row.shape[1], dtype=jnp.int32)[None]
        with nn.intercept_methods(record):
            _, state = build(config).apply({"params": params}, row, positions, jnp.ones_like(row), mutable="intermediates")
        return {path[:-1]: v for path, (v,) in flatten_dict(state["intermediates"]).items()}

    found: dict[ParamPath, Array] = {}
    for row in tokens:
        for path, v in run(params, row[None]).items():
            found[path] = jnp.maximum(found[path], v) if path in found else v
    return found


def smooth(
    config: Config, params: Any, absmax: dict[ParamPath, Array], alpha: float = SMOOTH_ALPHA
) -> tuple[Factors, dict[ParamPath, Array]]:
    """SmoothQuant, folded (see the module docstring): (factors per weight, replaced float32 norm scales).

    Which parameter each projection's input division folds into is the schema's `smooth_from`: an
    RMSNorm scale (one factor per input channel, shared by every projection that norm feeds), or
    a projection whose output channels the input is linear in (o in v's, shared per KV group;
    down in up's). Multiplying each weight by its factors and swapping in the norms gives the
    same float function.
    """
    flat = flatten_dict(params)
    specs = family_of(config).tensor_specs(config).values()
    by_path = {s.path: s for s in specs}
    groups: dict[ParamPath, list] = {}  # the feeding parameter -> the projections reading it, in schema order
    for s in specs:
        if s.param.smooth_from is not None:
            groups.setdefault(tuple(s.param.smooth_from.format(i=s.layer).split("/")), []).append(s)
    factors: dict[ParamPath, list[Array]] = {}
    norms: dict[ParamPath, Array] = {}

    def input_max(path: ParamPath, n_in: int) -> Array:  # max |W| per input channel (the trailing n_in dims)
        w = jnp.abs(flat[path])
        return jnp.max(w.reshape(-1, *w.shape[w.ndim - n_in :]), axis=0).astype(jnp.float32)

    def factor(x_max: Array, w_max: Array) -> Array:
        return jnp.where((x_max > 0) & (w_max > 0), x_max**alpha / w_max ** (1 - alpha), 1.0)

    for fed_by, readers in groups.items():
        n_in = readers[0].param.int8_in
        x_max = absmax[readers[0].path[:-1]]  # the readers' shared input, over their contracted dims
        w_max = jnp.max(jnp.stack([input_max(r.path, n_in) for r in readers]), axis=0)
        source = by_path[fed_by]
        if source.param.norm is not None:  # a norm: divide its output channels
            s = factor(x_max, w_max)
            scale = flat[fed_by].astype(jnp.float32)
            norms[fed_by] = (1.0 + scale) / s - 1.0 if source.param.norm == "zero_centred" else scale / s
        else:  # a projection's output channels, each read by G input channels of the readers (G query heads per KV head)
            out = source.shape[: len(source.shape) - source.param.int8_in]
            G = x_max.size // math.prod(out)
            grouped = lambda a: a.reshape(out[0], G, *out[1:]).max(1)
            s_out = factor(grouped(x_max), grouped(w_max))
            s = jnp.repeat(s_out, G, axis=0).reshape(x_max.shape)
            factors.setdefault(fed_by, []).append(1.0 / s_out.reshape(*out, *(1,) * source.param.int8_in))
        for r in readers:
            factors.setdefault(r.path, []).append(s)  # the trailing (input) dims
    return {p: tuple(f) for p, f in factors.items()}, norms


def tree_bytes(tree: Any) -> int:
    """Bytes held by a pytree of arrays (what a checkpoint of it stores, before file overheads)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
