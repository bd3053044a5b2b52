"""Every Gemma 3n parameter: our path, shape and logical axes, its Hugging Face and GGUF names,
and how it quantizes (see `gemma_jax.models.family.Param`).

Dimension letters: V vocab, W per-layer-input vocab, D embed, P per-layer-input width, E = L * P
(all layers' per-layer inputs), A AltUp streams, N heads, K kv heads, H head_dim, R LAuReL rank,
F the layer's MLP width. Norms multiply by the stored scale ("plain"). The AltUp stream projections
are one tensor per extra stream, so their "{i}" runs over the A - 1 extra streams (rows held where
`altup_extra_stream` holds; the config keeps A - 1 <= the layer count); every other "{i}" is a layer.
KV-sharing layers have no k/v/k_norm (`kv_owner`); HF checkpoints may still carry unused ones.

SmoothQuant (`smooth_from`): gate/up read only the pre-MLP norm, and down reads gelu(gate) * up,
linear in up's output channels. The pre-attention norm's output also joins LAuReL's residual sum
and v is RMS-normed after its projection, so q/k/v/o get no smoothing (it would not be exact).
"""

from __future__ import annotations

from collections.abc import Callable

from gemma_jax.models.family import Param
from gemma_jax.models.gemma3n.config import Gemma3nConfig


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
    "altup_extra_stream": lambda config, i: i < config.altup_num_inputs - 1,  # "{i}": an extra stream
}
_HF, _BLK = "model.layers.{i}.", "blk.{i}."
HF_TEXT_PREFIX = "model.language_model."  # Gemma3nForConditionalGeneration's text stack; towers beside it are not read


def hf_unused(config: Gemma3nConfig, name: str) -> bool:
    """k/v projections and k norms of KV-sharing layers, which checkpoints of older transformers versions carry
    although no forward reads them."""
    parts = name.split(".")
    if len(parts) != 6 or parts[:2] != ["model", "layers"] or parts[3] != "self_attn" or not parts[2].isdigit():
        return False
    layer = int(parts[2])
    return parts[4] in ("k_proj", "v_proj", "k_norm") and layer < config.num_layers and config.kv_source(layer) != layer
_NORM = ("norm",)


def _norm(path: str, hf: str, gguf: str, shape: str = "D", **kw) -> Param:
    return Param(path, shape, _NORM, hf, shape, f"{gguf}.weight", norm="plain", **kw)


def _linear(
    path: str, shape: str, axes: tuple[str, ...], hf: str, hf_shape: str, gguf: str | None, int8_in: int | None = 1, **kw
) -> Param:
    """A torch Linear weight; int8 over its input dim (`int8_in` trailing dims) unless None."""
    return Param(path, shape, axes, hf, hf_shape, gguf and f"{gguf}.weight", int8_in=int8_in, linear=True, **kw)


# fmt: off
SCHEMA: tuple[Param, ...] = (
    Param("embedder/embedding", "V D", ("vocab", "embed"), "model.embed_tokens.weight", "V D", "token_embd.weight", int8_in=1),
    Param("per_layer_embedder/embedding", "W E", ("vocab", "embed"), "model.embed_tokens_per_layer.weight", "W E",
          "per_layer_token_embd.weight", int8_in=1, lookup=True),
    _linear("per_layer_proj/w", "E D", ("per_layer", "embed"), "model.per_layer_model_projection.weight", "E D",
            "per_layer_model_proj"),
    _norm("per_layer_proj_norm/scale", "model.per_layer_projection_norm.weight", "per_layer_proj_norm", "P"),
    # --- per layer: AltUp's router and coefficients (tiny: kept in float) ---
    _linear("layer_{i}/altup/router/w", "A D", ("altup", "embed"), _HF + "altup.modality_router.weight", "A D",
            _BLK + "altup_router", int8_in=None),
    _norm("layer_{i}/altup/router_norm/scale", _HF + "altup.router_norm.weight", _BLK + "altup_router_norm"),
    _linear("layer_{i}/altup/predict_coefs", "A A A", ("altup", "altup", "altup"), _HF + "altup.prediction_coefs.weight",
            "AA A", _BLK + "altup_predict_coef", int8_in=None),
    _linear("layer_{i}/altup/correct_coefs", "A A", ("altup", "altup"), _HF + "altup.correction_coefs.weight", "A A",
            _BLK + "altup_correct_coef", int8_in=None),
    Param("layer_{i}/altup/correct_scale", "D", _NORM, _HF + "altup.correct_output_scale", "D",
          _BLK + "altup_correct_scale.weight"),
    # --- attention and LAuReL, on the normed active stream ---
    _norm("layer_{i}/pre_attn_norm/scale", _HF + "input_layernorm.weight", _BLK + "attn_norm"),
    _linear("layer_{i}/laurel/left/w", "R D", ("laurel", "embed"), _HF + "laurel.linear_left.weight", "R D", _BLK + "laurel_l"),
    _linear("layer_{i}/laurel/right/w", "D R", ("embed", "laurel"), _HF + "laurel.linear_right.weight", "D R", _BLK + "laurel_r"),
    _norm("layer_{i}/laurel/norm/scale", _HF + "laurel.post_laurel_norm.weight", _BLK + "laurel_post_norm"),
    _linear("layer_{i}/attn/q/w", "N H D", ("q_heads", "head_dim", "embed"), _HF + "self_attn.q_proj.weight", "NH D",
            _BLK + "attn_q"),
    _norm("layer_{i}/attn/q_norm/scale", _HF + "self_attn.q_norm.weight", _BLK + "attn_q_norm", "H"),
    _linear("layer_{i}/attn/k/w", "K H D", ("kv_heads", "head_dim", "embed"), _HF + "self_attn.k_proj.weight", "KH D",
            _BLK + "attn_k", layers="kv_owner"),
    _linear("layer_{i}/attn/v/w", "K H D", ("kv_heads", "head_dim", "embed"), _HF + "self_attn.v_proj.weight", "KH D",
            _BLK + "attn_v", layers="kv_owner"),
    _norm("layer_{i}/attn/k_norm/scale", _HF + "self_attn.k_norm.weight", _BLK + "attn_k_norm", "H", layers="kv_owner"),
    _linear("layer_{i}/attn/o/w", "D N H", ("embed", "q_heads", "head_dim"), _HF + "self_attn.o_proj.weight", "D NH",
            _BLK + "attn_output", int8_in=2),
    _norm("layer_{i}/post_attn_norm/scale", _HF + "post_attention_layernorm.weight", _BLK + "post_attention_norm"),
    # --- MLP ---
    _norm("layer_{i}/pre_ffw_norm/scale", _HF + "pre_feedforward_layernorm.weight", _BLK + "ffn_norm"),
    _linear("layer_{i}/mlp/gate/w", "F D", ("mlp", "embed"), _HF + "mlp.gate_proj.weight", "F D", _BLK + "ffn_gate",
            smooth_from="layer_{i}/pre_ffw_norm/scale"),
    _linear("layer_{i}/mlp/up/w", "F D", ("mlp", "embed"), _HF + "mlp.up_proj.weight", "F D", _BLK + "ffn_up",
            smooth_from="layer_{i}/pre_ffw_norm/scale"),
    _linear("layer_{i}/mlp/down/w", "D F", ("embed", "mlp"), _HF + "mlp.down_proj.weight", "D F", _BLK + "ffn_down",
            smooth_from="layer_{i}/mlp/up/w"),
    _norm("layer_{i}/post_ffw_norm/scale", _HF + "post_feedforward_layernorm.weight", _BLK + "post_ffw_norm"),
    # --- the per-layer input, gated by the corrected active stream ---
    _linear("layer_{i}/ple_gate/w", "P D", ("per_layer", "embed"), _HF + "per_layer_input_gate.weight", "P D", _BLK + "inp_gate"),
    _linear("layer_{i}/ple_proj/w", "D P", ("embed", "per_layer"), _HF + "per_layer_projection.weight", "D P", _BLK + "proj"),
    _norm("layer_{i}/post_ple_norm/scale", _HF + "post_per_layer_input_norm.weight", _BLK + "post_norm"),
    # --- model-wide, after the layers: AltUp's stream projections ("{i}": the extra stream), the final norm.
    # GGUF stacks each set into one tensor [A-1, D, D], stream by stream.
    _linear("altup_proj_{i}/w", "D D", ("embed", "embed"), "model.altup_projections.{i}.weight", "D D", "altup_proj",
            layers="altup_extra_stream", gguf_stacked=True),
    _linear("altup_unembed_{i}/w", "D D", ("embed", "embed"), "model.altup_unembed_projections.{i}.weight", "D D",
            "altup_unembd_proj", layers="altup_extra_stream", gguf_stacked=True),
    _norm("final_norm/scale", "model.norm.weight", "output_norm"),
)
# fmt: on
