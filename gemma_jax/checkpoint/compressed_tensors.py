"""compressed-tensors W8A8 int8 checkpoints (neuralmagic / RedHatAI `*-quantized.w8a8`): import and export.

Such a checkpoint is a HF directory whose config.json carries a `quantization_config` with
`quant_method: compressed-tensors` and `format: int-quantized`. Every Linear layer it targets (the
projections, minus those its `ignore` list names; the tied `lm_head` is always ignored) is stored
as an int8 `weight` [out, in] beside a per-output-channel `weight_scale` [out, 1] in the model's
float dtype. Weights are symmetric (no zero point); activations are quantized per token at run
time, so no activation scales are stored. The embedding and norms stay float.

Import dequantizes, `weight * weight_scale` (exact in float32, then cast to `dtype`: by default
the scale's dtype, which is what compressed-tensors itself returns), until our int8
representation lands. Export quantizes each projection as compressed-tensors does (scale =
absmax / 127.5 per output channel, q = clamp(round(w / scale), -128, 127)), so importing the
export gives every weight back within half a quantization step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
import re2

from gemma_jax.checkpoint.hf import (
    CONFIG_FILE, TOKENIZER_FILE, hf_config, locate_tensors, read_hf_config, read_json, read_tensor, read_tokenizer,
    write_hf_dir,
)  # fmt: skip
from gemma_jax.checkpoint.registry import Format, register
from gemma_jax.checkpoint.source import FLOAT_DTYPES, Put, Shape, TensorSource, collect
from gemma_jax.models import Config, TensorSpec, tensor_specs
from gemma_jax.models.family import check_layer_count, check_shapes
from gemma_jax.tokenizer import Tokenizer

QUANT_METHOD, FORMAT = "compressed-tensors", "int-quantized"
INT8 = np.dtype(np.int8)
_HALF_RANGE = 127.5  # (127 - (-128)) / 2: compressed-tensors' symmetric int8 step
_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None, "dynamic": False}
_WEIGHT_DEFAULTS = {"group_size": None, "dynamic": False}  # compressed-tensors' defaults for omitted fields
_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is reported as our error, not also logged to stderr
QUANTIZATION_CONFIG: dict[str, Any] = {  # what export writes: W8A8, as llm-compressor writes it
    "quant_method": QUANT_METHOD,
    "format": FORMAT,
    "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": _WEIGHTS, "input_activations": _ACTIVATIONS,
                                  "output_activations": None}},  # fmt: skip
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
}


def is_compressed_tensors(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a HF directory whose config.json declares compressed-tensors quantization."""
    file = Path(path) / CONFIG_FILE
    try:
        quant = read_json(file).get("quantization_config") if file.is_file() else None
    except ValueError:
        return False
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def compressed_tensors_source(path: str | os.PathLike[str], *, dtype: npt.DTypeLike | None = None) -> TensorSource:
    """Open a W8A8 compressed-tensors checkpoint for streaming, dequantizing each projection as it is read."""
    root = Path(path)
    config = read_hf_config(root)
    located = locate_tensors(root)
    check_layer_count(config, len(located), root / CONFIG_FILE)
    specs = tensor_specs(config)
    quantized = _quantized(root / CONFIG_FILE, specs)
    stored = {name: entry for s in specs.values() for name, entry in _stored(s, s.hf_name in quantized).items()}
    check_shapes({name: loc.shape for name, loc in located.items()}, {name: shape for name, (shape, _) in stored.items()},
               f"{root} (compressed-tensors W8A8)")  # fmt: skip
    for name, (_, kind) in stored.items():
        if located[name].dtype not in ((INT8,) if kind == "int8" else FLOAT_DTYPES):
            raise ValueError(f"{root}: tensor {name} is {located[name].dtype.name}; this format stores it as {kind}")
    cast = None if dtype is None else np.dtype(dtype)
    value_of = lambda s: _scale_name(s.hf_name) if s.hf_name in quantized else s.hf_name  # its output dtype
    dtypes = {s.path: cast or located[value_of(s)].dtype for s in specs.values()}

    def read(spec: TensorSpec) -> np.ndarray:
        w = read_tensor(located[spec.hf_name].file, spec.hf_name)
        if spec.hf_name in quantized:
            scale = read_tensor(located[_scale_name(spec.hf_name)].file, _scale_name(spec.hf_name))
            # float32 product: exact for bf16/f16 scales; rounded once for f32 ones, as compressed-tensors does
            w = w.astype(np.float32) * scale.astype(np.float32)
        return spec.to_ours(w.astype(dtypes[spec.path], copy=False))

    return TensorSource(config, dtypes, read, read_tokenizer(root / TOKENIZER_FILE, config), origin=str(root))


def load_compressed_tensors(
    path: str | os.PathLike[str], *, dtype: npt.DTypeLike | None = None, put: Put | None = None
) -> tuple[Config, dict[str, Any], Tokenizer | None]:
    """Load a W8A8 compressed-tensors checkpoint as (config, dequantized params, tokenizer); `put` as in `load_hf`."""
    source = compressed_tensors_source(path, dtype=dtype)
    params = collect(source, put)
    return source.config, params, None if source.tokenizer is None else Tokenizer(source.tokenizer)


def save_compressed_tensors(
    path: str | os.PathLike[str], source: TensorSource, *, max_shard_bytes: int = 2**31, overwrite: bool = False
) -> Path:
    """Write `source` as a W8A8 compressed-tensors checkpoint (int8 projections, float embedding and norms), streaming."""
    layout: dict[str, tuple[Shape, np.dtype]] = {}
    for s in source.specs.values():
        for name, (shape, kind) in _stored(s, s.linear).items():
            layout[name] = (shape, INT8 if kind == "int8" else np.dtype(source.dtypes[s.path]))

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for s, x in source:
            w = s.to_hf(np.asarray(x))
            if s.linear:
                q, scale = quantize(w)
                yield s.hf_name, q
                yield _scale_name(s.hf_name), scale
            else:
                yield s.hf_name, w

    config_json = {**hf_config(source.config, layout), "quantization_config": QUANTIZATION_CONFIG}
    return write_hf_dir(path, config_json, layout, tensors(), tokenizer=source.tokenizer,
                        max_shard_bytes=max_shard_bytes, overwrite=overwrite)  # fmt: skip


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8 of a [out, in] weight: (int8 weight, scale [out, 1] in w's dtype).

    The int8 values are computed with the stored (rounded) scale, so `q * scale` is the closest
    the stored pair can come to `w`. An all-zero row gets the dtype's epsilon as its scale, as in
    compressed-tensors (any positive scale decodes it exactly).
    """
    w32 = w.astype(np.float32)
    scale = (np.max(np.abs(w32), axis=1, keepdims=True) / _HALF_RANGE).astype(w.dtype)
    scale = np.where(scale == 0, ml_dtypes.finfo(w.dtype).eps, scale).astype(w.dtype)
    q = np.clip(np.round(w32 / scale.astype(np.float32)), -128, 127).astype(INT8)
    return q, scale


def _scale_name(weight_name: str) -> str:
    return weight_name.removesuffix("weight") + "weight_scale"


def _stored(spec: TensorSpec, quantized: bool) -> dict[str, tuple[Shape, str]]:
    """The tensors one of our params is stored as: name -> (shape, "int8" or "float")."""
    if not quantized:
        return {spec.hf_name: (spec.hf_shape, "float")}
    return {spec.hf_name: (spec.hf_shape, "int8"), _scale_name(spec.hf_name): ((spec.hf_shape[0], 1), "float")}


def _quantized(file: Path, specs: Mapping[str, TensorSpec]) -> set[str]:
    """HF names of the weights stored as int8, after checking the config declares the W8A8 scheme we read."""
    quant = read_json(file).get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{file}: no compressed-tensors quantization_config")
    if quant.get("format") != FORMAT:
        raise ValueError(f"{file}: compressed-tensors format {quant.get('format')!r} is not supported; only {FORMAT!r} (W8A8)")
    groups = list((quant.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"{file}: expected one quantization config group, found {len(groups)}")
    [group] = groups
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    differ = {k: weights.get(k) for k, v in _WEIGHTS.items() if weights.get(k, _WEIGHT_DEFAULTS.get(k)) != v}
    if differ or group.get("targets") != ["Linear"] or group.get("output_activations") or quant.get("kv_cache_scheme"):
        raise ValueError(f"{file}: only W8A8 int8 with symmetric per-channel weights on Linear layers is supported "
                         f"(weights {differ or 'ok'}, targets {group.get('targets')})")  # fmt: skip
    if acts is not None and not acts.get("dynamic"):
        raise ValueError(f"{file}: static activation quantization (stored input scales) is not supported")
    ignore = quant.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise ValueError(f"{file}: quantization_config.ignore must be a list of strings, got {ignore!r:.80}")
    matchers = [_matcher(file, p) for p in ignore]
    return {s.hf_name for s in specs.values() if s.linear and not any(m(s.hf_name.removesuffix(".weight")) for m in matchers)}


def _matcher(file: Path, pattern: str) -> Callable[[str], bool]:
    """compressed-tensors' `ignore` matching: an exact module name, or a "re:" regex matched at the start.

    The regex runs on RE2, whose time is linear in the name, as Python's backtracking engine's is
    not: a pattern like "(.*.*)*Z" would otherwise stall loading for ever. RE2 lacks only
    backreferences and lookaround, which module-name patterns do not need; such a pattern is refused.
    """
    if not pattern.startswith("re:"):
        return lambda module: module == pattern
    try:
        regex = re2.compile(pattern[3:], _RE2_OPTIONS)
    except re2.error as e:
        raise ValueError(f"{file}: ignore pattern {pattern!r} is not a regex RE2 can run ({e})") from e
    return lambda module: regex.match(module) is not None


register(Format(
    "compressed-tensors", "the same, int8 W8A8 (config.json has a compressed-tensors quantization_config)",
    is_compressed_tensors, compressed_tensors_source,
    lambda dst, source, o: save_compressed_tensors(dst, source, max_shard_bytes=o.max_shard_bytes, overwrite=o.overwrite),
    refines="hf",
))  # fmt: skip
