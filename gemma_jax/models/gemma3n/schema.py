"""Every Gemma 3n parameter: our path, shape and logical axes, its Hugging Face and GGUF names,
how it quantizes — and the schema-driven conversion to and from Hugging Face tensors.

Rows follow the coordinator's `Param` format (/work/notes/SCHEMA.md). One extension: the AltUp
stream projections are one tensor per extra stream, not per layer, so their "{i}" runs over the
A - 1 extra streams (`INDEX_RANGE`); every other "{i}" is the layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from gemma_jax.models.gemma3n.config import Gemma3nConfig


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a family (one per layer when `path` holds "{i}"). A local copy of the
    coordinator's `gemma_jax.models.family.Param`, until that lands on main."""

    path: str
    shape: str
    axes: tuple[str, ...]
    hf: str
    hf_shape: str
    gguf: str | None = None
    int8_in: int | None = None
    linear: bool = False
    norm: str | None = None
    smooth_from: str | None = None
    when: str | None = None
    layers: str | None = None


def dims(config: Gemma3nConfig, i: int | None = None) -> dict[str, int]:
    """Dimension letters -> sizes (F, the MLP width, only for a layer `i`)."""
    sizes = dict(
        V=config.vocab_size, W=config.per_layer_vocab_size, D=config.embed_dim, P=config.per_layer_dim,
        E=config.num_layers * config.per_layer_dim, A=config.altup_num_inputs, N=config.num_heads,
        K=config.num_kv_heads, H=config.head_dim, R=config.laurel_rank,
    )  # fmt: skip
    if i is not None and 0 <= i < config.num_layers:
        sizes["F"] = config.mlp_dim[i]
    return sizes


WHEN: dict[str, Callable[..., bool]] = {
    "kv_owner": lambda config, i: config.kv_source(i) == i,  # layers computing their own keys and values
    "altup_extra_stream": lambda config, i: i < config.altup_num_inputs - 1,
}
# How far "{i}" runs for rows whose `layers` predicate names it (default: over the layers).
INDEX_RANGE: dict[str, Callable[[Gemma3nConfig], int]] = {"altup_extra_stream": lambda config: config.altup_num_inputs - 1}

_HF, _GGUF = "model.layers.{i}.", "blk.{i}."
_D, _NORM = ("embed",), ("norm",)


def _norm(path: str, hf: str, gguf: str | None, shape: str = "D") -> Param:
    return Param(path, shape, _NORM, hf, shape, gguf, norm="plain")


def _linear(path: str, shape: str, axes: tuple[str, ...], hf: str, hf_shape: str, gguf: str | None, **kw: Any) -> Param:
    return Param(path, shape, axes, hf, hf_shape, gguf, int8_in=kw.pop("int8_in", 1), linear=True, **kw)


SCHEMA: tuple[Param, ...] = (
    Param("embedder/embedding", "V D", ("vocab", "embed"), "model.embed_tokens.weight", "V D", "token_embd", int8_in=1),
    Param("per_layer_embedder/embedding", "W E", ("vocab", "embed"), "model.embed_tokens_per_layer.weight", "W E",
          "per_layer_token_embd", int8_in=1),  # fmt: skip
    _linear("per_layer_proj/w", "E D", ("per_layer", "embed"), "model.per_layer_model_projection.weight", "E D", "per_layer_model_proj"),
    _norm("per_layer_proj_norm/scale", "model.per_layer_projection_norm.weight", "per_layer_proj_norm", "P"),
    # GGUF stacks the A - 1 projections into one tensor each ("altup_proj", "altup_unembd_proj"): no per-stream name.
    _linear("altup_proj_{i}/w", "D D", ("embed", "embed"), "model.altup_projections.{i}.weight", "D D", None,
            layers="altup_extra_stream"),  # fmt: skip
    _linear("altup_unembed_{i}/w", "D D", ("embed", "embed"), "model.altup_unembed_projections.{i}.weight", "D D", None,
            layers="altup_extra_stream"),  # fmt: skip
    _norm("final_norm/scale", "model.norm.weight", "output_norm"),
    # --- per layer: AltUp ---
    _linear("layer_{i}/altup/router/w", "A D", ("altup", "embed"), _HF + "altup.modality_router.weight", "A D",
            _GGUF + "altup_router", int8_in=None),  # fmt: skip
    _norm("layer_{i}/altup/router_norm/scale", _HF + "altup.router_norm.weight", _GGUF + "altup_router_norm"),
    _linear("layer_{i}/altup/predict_coefs", "A A A", ("altup", "altup", "altup"), _HF + "altup.prediction_coefs.weight",
            "AA A", _GGUF + "altup_predict_coef", int8_in=None),  # fmt: skip
    _linear("layer_{i}/altup/correct_coefs", "A A", ("altup", "altup"), _HF + "altup.correction_coefs.weight", "A A",
            _GGUF + "altup_correct_coef", int8_in=None),  # fmt: skip
    Param("layer_{i}/altup/correct_scale", "D", _NORM, _HF + "altup.correct_output_scale", "D", _GGUF + "altup_correct_scale"),
    # --- attention and LAuReL, on the normed active stream ---
    _norm("layer_{i}/pre_attn_norm/scale", _HF + "input_layernorm.weight", _GGUF + "attn_norm"),
    _linear("layer_{i}/laurel/left/w", "R D", ("laurel", "embed"), _HF + "laurel.linear_left.weight", "R D", _GGUF + "laurel_l"),
    _linear("layer_{i}/laurel/right/w", "D R", ("embed", "laurel"), _HF + "laurel.linear_right.weight", "D R", _GGUF + "laurel_r"),
    _norm("layer_{i}/laurel/norm/scale", _HF + "laurel.post_laurel_norm.weight", _GGUF + "laurel_post_norm"),
    _linear("layer_{i}/attn/q/w", "N H D", ("q_heads", "head_dim", "embed"), _HF + "self_attn.q_proj.weight", "NH D", _GGUF + "attn_q", int8_in=1),
    _norm("layer_{i}/attn/q_norm/scale", _HF + "self_attn.q_norm.weight", _GGUF + "attn_q_norm", "H"),
    _linear("layer_{i}/attn/k/w", "K H D", ("kv_heads", "head_dim", "embed"), _HF + "self_attn.k_proj.weight", "KH D", _GGUF + "attn_k",
            layers="kv_owner"),  # fmt: skip
    _linear("layer_{i}/attn/v/w", "K H D", ("kv_heads", "head_dim", "embed"), _HF + "self_attn.v_proj.weight", "KH D", _GGUF + "attn_v",
            layers="kv_owner"),  # fmt: skip
    dataclasses.replace(_norm("layer_{i}/attn/k_norm/scale", _HF + "self_attn.k_norm.weight", _GGUF + "attn_k_norm", "H"), layers="kv_owner"),
    _linear("layer_{i}/attn/o/w", "D N H", ("embed", "q_heads", "head_dim"), _HF + "self_attn.o_proj.weight", "D NH", _GGUF + "attn_output",
            int8_in=2),  # fmt: skip
    _norm("layer_{i}/post_attn_norm/scale", _HF + "post_attention_layernorm.weight", _GGUF + "post_attention_norm"),
    # --- MLP: its pre-norm feeds only gate and up, so SmoothQuant can fold into it exactly ---
    _norm("layer_{i}/pre_ffw_norm/scale", _HF + "pre_feedforward_layernorm.weight", _GGUF + "ffn_norm"),
    _linear("layer_{i}/mlp/gate/w", "F D", ("mlp", "embed"), _HF + "mlp.gate_proj.weight", "F D", _GGUF + "ffn_gate",
            smooth_from="layer_{i}/pre_ffw_norm/scale"),  # fmt: skip
    _linear("layer_{i}/mlp/up/w", "F D", ("mlp", "embed"), _HF + "mlp.up_proj.weight", "F D", _GGUF + "ffn_up",
            smooth_from="layer_{i}/pre_ffw_norm/scale"),  # fmt: skip
    _linear("layer_{i}/mlp/down/w", "D F", ("embed", "mlp"), _HF + "mlp.down_proj.weight", "D F", _GGUF + "ffn_down"),
    _norm("layer_{i}/post_ffw_norm/scale", _HF + "post_feedforward_layernorm.weight", _GGUF + "post_ffw_norm"),
    # --- per-layer input, gated by the corrected active stream ---
    _linear("layer_{i}/ple_gate/w", "P D", ("per_layer", "embed"), _HF + "per_layer_input_gate.weight", "P D", _GGUF + "inp_gate"),
    _linear("layer_{i}/ple_proj/w", "D P", ("embed", "per_layer"), _HF + "per_layer_projection.weight", "D P", _GGUF + "proj"),
    _norm("layer_{i}/post_ple_norm/scale", _HF + "post_per_layer_input_norm.weight", _GGUF + "post_norm"),
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One concrete parameter of a config: a schema row at one index."""

    row: Param
    path: str
    shape: tuple[int, ...]
    hf: str
    hf_shape: tuple[int, ...]
    gguf: str | None


def entries(config: Gemma3nConfig) -> Iterator[Entry]:
    """Every parameter `config` has, in schema order."""
    for row in SCHEMA:
        if row.when is not None and not WHEN[row.when](config):
            continue
        if "{i}" not in row.path:
            indices: Any = [None]
        else:
            count = INDEX_RANGE.get(row.layers, lambda c: c.num_layers)(config)
            indices = [i for i in range(count) if row.layers is None or WHEN[row.layers](config, i)]
        for i in indices:
            layer = i if row.path.startswith("layer_") else None
            sizes = dims(config, layer)
            size = lambda spec: tuple(math.prod(sizes[c] for c in word) for word in spec.split())
            fill = lambda s: s if s is None else s.format(i=i)
            yield Entry(row, fill(row.path), size(row.shape), fill(row.hf), size(row.hf_shape), fill(row.gguf))


def params_from_hf(config: Gemma3nConfig, tensors: Mapping[str, Any]) -> dict:
    """Our params pytree (numpy) from Hugging Face tensors by name (`Gemma3nForCausalLM` names; a
    multimodal checkpoint's `model.language_model.` prefix must be mapped to `model.` first).
    Tensors the schema does not name (e.g. the unused k/v of KV-sharing layers) are ignored."""
    flat = {}
    for e in entries(config):
        if e.hf not in tensors:
            raise KeyError(f"tensor {e.hf} is missing")
        value = np.asarray(tensors[e.hf])
        if value.shape != e.hf_shape:
            raise ValueError(f"tensor {e.hf} has shape {value.shape}, expected {e.hf_shape}")
        flat[tuple(e.path.split("/"))] = value.reshape(e.shape)
    return unflatten_dict(flat)


def params_to_hf(config: Gemma3nConfig, params: Any) -> dict[str, np.ndarray]:
    """Hugging Face tensors by name (contiguous numpy) from our params pytree."""
    flat = flatten_dict(params)
    return {e.hf: np.ascontiguousarray(np.asarray(flat[tuple(e.path.split("/"))]).reshape(e.hf_shape)) for e in entries(config)}
