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
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

from gemma_jax.config import GemmaConfig
from gemma_jax.kernels import SCHEMES
from gemma_jax.kernels.reference import INT8_MAX
from gemma_jax.layers import Einsum
from gemma_jax.model import Transformer, init_params

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
    config: GemmaConfig, params: Any, scheme: str, *, calibration: np.ndarray | None = None, alpha: float = SMOOTH_ALPHA
) -> dict:
    """The int8 tree of a float param tree (see the module docstring). `scheme`: "w8a8" or "w8a16".

    `calibration` (W8A8 only): token ids [B T] of representative text, for SmoothQuant; without
    it W8A8 is plain per-token x per-channel int8.
    """
    factors, norms = smoothing(config, params, scheme, calibration, alpha)
    flat = flatten_dict(params)
    return unflatten_dict(dict(quantized_leaves(config, flat.__getitem__, scheme, factors, norms)))


def smoothing(
    config: GemmaConfig, params: Any, scheme: str, calibration: np.ndarray | None, alpha: float = SMOOTH_ALPHA
) -> tuple[Factors, dict[ParamPath, Array]]:
    """SmoothQuant's (factors, norms) for `quantized_leaves`, from calibration tokens; none without them."""
    _check(scheme, calibration is not None)
    if calibration is None:
        return {}, {}
    return smooth(config, params, input_absmax(config, params, calibration), alpha)


def quantized_leaves(
    config: GemmaConfig, read: Callable[[ParamPath], Array], scheme: str, factors: Factors = {}, norms: Mapping = {}
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


def quantized_layout(config: GemmaConfig, scheme: str) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """Path -> shape and dtype of every leaf of the int8 tree (int8 weights, float32 scales, float norms)."""
    _check(scheme)
    return flatten_dict(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), quant=scheme)))


def _check(scheme: str, calibrated: bool = False) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if calibrated and scheme != "w8a8":
        raise ValueError("calibration (SmoothQuant) is for w8a8; w8a16 keeps activations in float")


def input_absmax(config: GemmaConfig, params: Any, tokens: np.ndarray) -> dict[ParamPath, Array]:
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
            _, state = Transformer(config).apply({"params": params}, row, positions, jnp.ones_like(row), mutable="intermediates")
        return {path[:-1]: v for path, (v,) in flatten_dict(state["intermediates"]).items()}

    found: dict[ParamPath, Array] = {}
    for row in tokens:
        for path, v in run(params, row[None]).items():
            found[path] = jnp.maximum(found[path], v) if path in found else v
    return found


def smooth(
    config: GemmaConfig, params: Any, absmax: dict[ParamPath, Array], alpha: float = SMOOTH_ALPHA
) -> tuple[Factors, dict[ParamPath, Array]]:
    """SmoothQuant, folded (see the module docstring): (factors per weight, replaced float32 norm scales).

    Multiplying each weight by its factors and swapping in the norms gives the same float function.
    """
    flat = flatten_dict(params)
    K, G, H = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
    factors: dict[ParamPath, list[Array]] = {}
    norms: dict[ParamPath, Array] = {}

    def input_max(path: ParamPath, n_in: int) -> Array:  # max |W| per input channel (the trailing n_in dims)
        w = jnp.abs(flat[path])
        return jnp.max(w.reshape(-1, *w.shape[w.ndim - n_in :]), axis=0).astype(jnp.float32)

    def factor(x_max: Array, w_max: Array) -> Array:
        return jnp.where((x_max > 0) & (w_max > 0), x_max**alpha / w_max ** (1 - alpha), 1.0)

    for i in range(config.num_layers):
        layer = f"layer_{i}"
        for norm, block, readers in (("pre_attn_norm", "attn", ("q", "k", "v")), ("pre_ffw_norm", "mlp", ("gate", "up"))):
            paths = [(layer, block, name, "w") for name in readers]
            s = factor(absmax[(layer, block, readers[0])], jnp.max(jnp.stack([input_max(p, 1) for p in paths]), axis=0))  # [D]
            for p in paths:
                factors.setdefault(p, []).append(s)  # [D]: the trailing (input) dim
            scale = flat[(layer, norm, "scale")].astype(jnp.float32)
            norms[(layer, norm, "scale")] = (1.0 + scale) / s - 1.0  # RMSNorm multiplies by (1 + w)
        # o reads the attention output, linear in v: one factor per (kv head, head dim), shared by its G query heads.
        o, v = (layer, "attn", "o", "w"), (layer, "attn", "v", "w")
        s = factor(absmax[o[:-1]].reshape(K, G, H).max(1), input_max(o, 2).reshape(K, G, H).max(1))  # [K H]
        factors.setdefault(o, []).append(jnp.repeat(s, G, axis=0))  # [N H]: o's input dims
        factors.setdefault(v, []).append(1.0 / s[:, :, None])  # v's output dims
        # down reads gelu(gate) * up, linear in up.
        down, up = (layer, "mlp", "down", "w"), (layer, "mlp", "up", "w")
        s = factor(absmax[down[:-1]], input_max(down, 1))  # [F]
        factors.setdefault(down, []).append(s)
        factors.setdefault(up, []).append(1.0 / s[:, None])
    return {p: tuple(f) for p, f in factors.items()}, norms


def tree_bytes(tree: Any) -> int:
    """Bytes held by a pytree of arrays (what a checkpoint of it stores, before file overheads)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    scheme: str,
    dtype: str = "bfloat16",
    calibration: str | os.PathLike[str] | None = None,
    calibration_tokens: int = 1024,
    ctx: int = 512,
    alpha: float = SMOOTH_ALPHA,
    force: bool = False,
    quiet: bool = False,
) -> str:
    """`gemma-jax quantize`: any checkpoint -> an int8 Orbax checkpoint of ours; returns the summary line.

    Without calibration the source streams one tensor at a time (memory: about the largest
    tensor). With a `calibration` text file (W8A8: SmoothQuant) the float model is held in memory
    to measure activations on `calibration_tokens` tokens of it, in rows of `ctx`. Non-int8
    leaves (norms) keep `dtype` (SmoothQuant's rescaled norms: float32); scales are float32.
    `gemma_jax.load(dst, mesh=...)` restores the result sharded.
    """
    from tqdm import tqdm

    from gemma_jax.checkpoint.hf import collect
    from gemma_jax.checkpoint.orbax import write_orbax
    from gemma_jax.checkpoint.resolve import checkpoint_path
    from gemma_jax.checkpoint.staging import refuse_existing
    from gemma_jax.convert import open_source, peak_rss
    from gemma_jax.tokenizer import Tokenizer

    start = time.perf_counter()
    refuse_existing(Path(dst), force)
    _check(scheme, calibration is not None)  # before any tensor is read
    if scheme == "w8a8" and calibration is None and not quiet:
        print("note: W8A8 without --calibration skips SmoothQuant; on Gemma 3 270M that cost +2.9% perplexity "
              "instead of +0.8-1.4% (benchmarks/quant_quality.py)", file=sys.stderr)  # fmt: skip
    source = open_source(checkpoint_path(src), dtype=dtype)
    config, specs = source.config, {s.path: s for s in source.specs.values()}
    factors, norms = {}, {}
    if calibration is None:
        read = lambda path: source.read(specs[path])
    else:
        if source.tokenizer is None:
            raise ValueError(f"{src} has no tokenizer.model to encode the calibration text {calibration} with")
        ids = Tokenizer(source.tokenizer).encode(Path(calibration).read_text(encoding="utf-8"), add_bos=True)
        rows = min(calibration_tokens, len(ids)) // ctx
        if rows == 0:
            raise ValueError(f"calibration text {calibration} has {len(ids)} tokens; at least --ctx={ctx} are needed")
        params = collect(source, lambda _, x: jnp.asarray(x))
        factors, norms = smoothing(config, params, scheme, np.asarray(ids[: rows * ctx]).reshape(rows, ctx), alpha)
        read = flatten_dict(params).__getitem__
    leaves = quantized_leaves(config, read, scheme, factors, norms)
    total, written = len(quantized_layout(config, scheme)), [0]

    def metered(items: Iterator[tuple[ParamPath, Array]]) -> Iterator[tuple[ParamPath, Array]]:
        for path, x in tqdm(items, total=total, unit="tensor", desc=f"quantize {scheme}", disable=quiet, file=sys.stderr):
            written[0] += x.nbytes
            yield path, x

    write_orbax(dst, config, metered(leaves), source.tokenizer, quant=scheme, overwrite=force)
    seconds = time.perf_counter() - start
    line = (f"quantized {src} ({scheme}{', SmoothQuant' if calibration else ''}): {source.nbytes / 1e9:.2f} GB -> "
            f"{written[0] / 1e9:.2f} GB ({written[0] / source.nbytes:.0%}) in {seconds:.1f} s; peak RSS {peak_rss() / 1e9:.2f} GB")  # fmt: skip
    if not quiet:
        print(line, file=sys.stderr)
    return line
