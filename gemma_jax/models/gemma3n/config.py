"""Gemma 3n (text) configuration: the Gemma field names plus AltUp, per-layer inputs, LAuReL,
KV sharing and activation sparsity, with per-layer MLP widths.

Gemma 3n is not a flag on the Gemma 1-3 decoder: every layer carries several residual streams
(AltUp) and a per-layer token embedding, its norms multiply by the stored scale as is, and its
last layers read earlier layers' keys and values. So it has its own config type, checked the
same way as `GemmaConfig` (a `ConfigError` names our field, or the config.json key in `from_hf`).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar


from gemma_jax.models.config_base import LAYER_KINDS, FamilyConfig, check_field, first, given, layer_pattern, required, short
from gemma_jax.models.family import ConfigError
from gemma_jax.models.heads import Head, head_of

MODEL_TYPE = "gemma3n_text"
MULTIMODAL_MODEL_TYPE = "gemma3n"  # Gemma3nForConditionalGeneration: the text stack is its `text_config`
# What each scalar field must hold (the per-layer tuples are checked on their own).
_FIELD_KINDS = {
    "vocab_size": "count", "embed_dim": "count", "num_layers": "count", "num_heads": "count",
    "num_kv_heads": "count", "head_dim": "count", "sliding_window": "optional count",
    "final_logit_softcap": "optional positive", "max_position": "count", "rope_base": "positive",
    "rope_local_base": "positive", "rms_norm_eps": "positive", "per_layer_vocab_size": "count",
    "per_layer_dim": "count", "altup_num_inputs": "count", "altup_active_idx": "index",
    "altup_coef_clip": "optional positive", "altup_correct_scale": "flag", "num_kv_shared_layers": "index",
    "laurel_rank": "count", "pad_id": "token id", "eos_id": "token id", "bos_id": "token id",
}  # fmt: skip
# Our field -> the Hugging Face config.json key it comes from, for error messages.
_HF_FIELD = {
    "embed_dim": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads", "mlp_dim": "intermediate_size", "layer_pattern": "layer_types",
    "final_logit_softcap": "final_logit_softcapping", "max_position": "max_position_embeddings",
    "rope_base": "rope_parameters.full_attention.rope_theta",
    "rope_local_base": "rope_parameters.sliding_attention.rope_theta", "per_layer_vocab_size": "vocab_size_per_layer_input",
    "per_layer_dim": "hidden_size_per_layer_input", "activation_sparsity": "activation_sparsity_pattern",
    "pad_id": "pad_token_id", "eos_id": "eos_token_id", "bos_id": "bos_token_id",
}  # fmt: skip
# transformers' Gemma3nTextConfig defaults (E4B's values) for keys a config.json leaves out.
_HF_DEFAULTS = dict(
    vocab_size_per_layer_input=262_144, hidden_size_per_layer_input=256, altup_num_inputs=4, altup_active_idx=0,
    altup_coef_clip=120.0, altup_correct_scale=True, num_kv_shared_layers=15, laurel_rank=64,
    sliding_window=512, final_logit_softcapping=30.0, max_position_embeddings=32_768, rms_norm_eps=1e-6,
)  # fmt: skip
_HF_SPARSE_LAYERS, _HF_SPARSITY = 10, 0.95  # transformers' default sparsity: the first 10 layers (of more than 10)


@dataclasses.dataclass(frozen=True)
class Gemma3nConfig(FamilyConfig):
    """Hyper-parameters of a Gemma 3n text decoder. Hashable (tuples only): a static jit argument."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = (MODEL_TYPE, MULTIMODAL_MODEL_TYPE)  # the config.json model_types it reads
    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: tuple[int, ...]  # per layer (an int is repeated over the layers)
    layer_pattern: tuple[str, ...] = ("local", "local", "local", "local", "global")  # repeated over the layers
    sliding_window: int | None = 512
    final_logit_softcap: float | None = 30.0
    max_position: int = 32_768
    rope_base: float = 1_000_000.0  # global layers
    rope_local_base: float = 10_000.0  # sliding-window layers
    rms_norm_eps: float = 1e-6
    # Per-layer inputs (PLE): a second token embedding, `per_layer_dim` wide for each layer.
    per_layer_vocab_size: int = 262_144  # ids at or past it read row 0
    per_layer_dim: int = 256
    # AltUp: `altup_num_inputs` residual streams; layers run on stream `altup_active_idx`.
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_coef_clip: float | None = 120.0  # bound on the prediction/correction coefficient weights
    altup_correct_scale: bool = True  # scale the corrected active stream before the per-layer input gate
    num_kv_shared_layers: int = 0  # the last layers reuse the KV of the last earlier layer of their kind
    laurel_rank: int = 64  # LAuReL: low-rank residual branch
    activation_sparsity: tuple[float, ...] = ()  # per layer in [0, 1); 0 = dense; () = all dense
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2
    model_type: str = MODEL_TYPE
    head: Head = Head()  # the LM's vocab logits: transformers has no Gemma 3n classifier to match

    def __post_init__(self) -> None:
        if self.model_type != MODEL_TYPE:
            raise ConfigError("model_type", f"is {self.model_type!r}; this family reads {MODEL_TYPE!r}")
        object.__setattr__(self, "head", head_of(self.head))  # a dict where a stored config is read back
        if not self.head.is_lm:
            raise ConfigError("head", "must be the causal LM's: Gemma 3n has no classification heads (transformers has none)")
        for name, kind in _FIELD_KINDS.items():
            check_field(self, name, kind)
        if isinstance(self.layer_pattern, list):
            object.__setattr__(self, "layer_pattern", tuple(self.layer_pattern))
        object.__setattr__(self, "mlp_dim", _per_layer(self.mlp_dim, self.num_layers, "mlp_dim", _check_count))
        sparsity = self.activation_sparsity if self.activation_sparsity != () else 0.0
        sparsity = _per_layer(sparsity, self.num_layers, "activation_sparsity", _check_fraction)
        object.__setattr__(self, "activation_sparsity", sparsity)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_heads", f"must be a multiple of num_kv_heads={self.num_kv_heads}, got {self.num_heads}")
        if not isinstance(self.layer_pattern, tuple) or not self.layer_pattern or set(self.layer_pattern) - set(LAYER_KINDS):
            raise ConfigError("layer_pattern", f"must list 'local'/'global' entries, got {short(self.layer_pattern)}")
        if "local" in self.layer_pattern and not self.sliding_window:
            raise ConfigError("sliding_window", "is not set, but layer_pattern has local layers")
        if self.altup_num_inputs - 1 > self.num_layers:  # the schema indexes the extra streams' projections like layers
            limit = self.num_layers + 1
            raise ConfigError("altup_num_inputs", f"must be at most num_layers + 1 = {limit}, got {self.altup_num_inputs}")
        if self.altup_active_idx >= self.altup_num_inputs:
            problem = f"must be below altup_num_inputs={self.altup_num_inputs}, got {self.altup_active_idx}"
            raise ConfigError("altup_active_idx", problem)
        if self.num_kv_shared_layers >= self.num_layers:
            problem = f"must be below num_layers={self.num_layers}, got {self.num_kv_shared_layers}"
            raise ConfigError("num_kv_shared_layers", problem)
        first_shared = self.num_layers - self.num_kv_shared_layers
        missing = set(self.layer_kinds[first_shared:]) - set(self.layer_kinds[:first_shared])
        if missing:
            raise ConfigError("num_kv_shared_layers", f"leaves no earlier {missing.pop()} layer to share keys and values from")

    # --- derived ---------------------------------------------------------------------------
    def rope_for(self, kind: str) -> tuple[float, float]:
        """(base, linear scale) of the rotary embedding on a 'local' or 'global' layer."""
        return (self.rope_local_base if kind == "local" else self.rope_base), 1.0

    def kv_source(self, i: int) -> int:
        """The layer whose keys and values layer `i` attends over: itself, or for the last
        `num_kv_shared_layers` layers, the last layer of the same kind before them."""
        first_shared = self.num_layers - self.num_kv_shared_layers
        if i < first_shared:
            return i
        kind = self.layer_kinds[i]
        return max(j for j in range(first_shared) if self.layer_kinds[j] == kind)

    # --- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Gemma3nConfig:
        """Build from a `gemma3n_text` config.json dict, or a multimodal `gemma3n` one (its `text_config`).

        Keys a config.json leaves out take transformers' defaults, as `Gemma3nTextConfig` does.
        Raises ConfigError naming the config.json key of any missing or invalid value.
        """
        if hf.get("model_type") == MULTIMODAL_MODEL_TYPE:
            hf = hf.get("text_config")
            if not isinstance(hf, dict):
                raise ConfigError("text_config", f"must be an object, got {short(hf)}")
            hf = {"model_type": MODEL_TYPE, **hf}
        if hf.get("model_type") != MODEL_TYPE:
            raise ConfigError("model_type", f"is {hf.get('model_type')!r}; supported: {MODEL_TYPE}, {MULTIMODAL_MODEL_TYPE}")
        act = given(hf, "hidden_activation", given(hf, "hidden_act", "gelu_pytorch_tanh"))
        if act != "gelu_pytorch_tanh":
            raise ConfigError("hidden_activation", f"is {act!r}; Gemma 3n uses gelu_pytorch_tanh")
        if hf.get("attention_bias"):
            raise ConfigError("attention_bias", "is set; Gemma 3n has no attention biases")
        hf = {**_HF_DEFAULTS, **hf}  # missing keys only: an explicit null (no soft-cap) stays null
        num_layers = required(hf, "num_hidden_layers")
        layer_types = hf.get("layer_types")
        if layer_types is None and isinstance(num_layers, int):  # transformers' default: every fifth layer global
            layer_types = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(num_layers)]
        hidden, heads = required(hf, "hidden_size"), required(hf, "num_attention_heads")
        divisible = all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (hidden, heads))
        sparsity = hf.get("activation_sparsity_pattern")
        if sparsity is None:
            sparse = _HF_SPARSE_LAYERS if isinstance(num_layers, int) and num_layers > _HF_SPARSE_LAYERS else 0
            sparsity = [_HF_SPARSITY] * sparse + [0.0] * ((num_layers if isinstance(num_layers, int) else 0) - sparse)
        try:
            return cls(
                vocab_size=required(hf, "vocab_size"),
                embed_dim=hidden,
                num_layers=num_layers,
                num_heads=heads,
                num_kv_heads=given(hf, "num_key_value_heads", heads),
                head_dim=given(hf, "head_dim", hidden // heads if divisible else None),
                mlp_dim=_listed(required(hf, "intermediate_size")),
                layer_pattern=layer_pattern(layer_types, num_layers),
                sliding_window=hf["sliding_window"],
                final_logit_softcap=hf["final_logit_softcapping"],
                max_position=hf["max_position_embeddings"],
                rope_base=_rope_theta(hf, "full_attention", "rope_theta", 1_000_000.0),
                rope_local_base=_rope_theta(hf, "sliding_attention", "rope_local_base_freq", 10_000.0),
                rms_norm_eps=hf["rms_norm_eps"],
                per_layer_vocab_size=hf["vocab_size_per_layer_input"],
                per_layer_dim=hf["hidden_size_per_layer_input"],
                altup_num_inputs=hf["altup_num_inputs"],
                altup_active_idx=hf["altup_active_idx"],
                altup_coef_clip=hf["altup_coef_clip"],
                altup_correct_scale=hf["altup_correct_scale"],
                num_kv_shared_layers=hf["num_kv_shared_layers"],
                laurel_rank=hf["laurel_rank"],
                activation_sparsity=_listed(sparsity),
                pad_id=given(hf, "pad_token_id", 0),
                eos_id=first(given(hf, "eos_token_id", 1)),
                bos_id=given(hf, "bos_token_id", 2),
            )
        except ConfigError as e:  # name the config.json key, not ours
            raise ConfigError(_HF_FIELD.get(e.field, e.field), e.problem) from None

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict that `transformers` loads as `Gemma3nForCausalLM`."""
        rope = lambda base: {"rope_theta": base, "rope_type": "default"}
        return dict(
            architectures=["Gemma3nForCausalLM"],
            model_type=MODEL_TYPE,
            vocab_size=self.vocab_size,
            hidden_size=self.embed_dim,
            intermediate_size=list(self.mlp_dim),
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            layer_types=["sliding_attention" if k == "local" else "full_attention" for k in self.layer_kinds],
            sliding_window=self.sliding_window,
            final_logit_softcapping=self.final_logit_softcap,
            max_position_embeddings=self.max_position,
            rope_parameters={"full_attention": rope(self.rope_base), "sliding_attention": rope(self.rope_local_base)},
            rms_norm_eps=self.rms_norm_eps,
            vocab_size_per_layer_input=self.per_layer_vocab_size,
            hidden_size_per_layer_input=self.per_layer_dim,
            altup_num_inputs=self.altup_num_inputs,
            altup_active_idx=self.altup_active_idx,
            altup_coef_clip=self.altup_coef_clip,
            altup_correct_scale=self.altup_correct_scale,
            num_kv_shared_layers=self.num_kv_shared_layers,
            laurel_rank=self.laurel_rank,
            activation_sparsity_pattern=[float(s) for s in self.activation_sparsity],
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            bos_token_id=self.bos_id,
            tie_word_embeddings=True,
            attention_bias=False,
            hidden_activation="gelu_pytorch_tanh",
        )


def _check_count(name: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ConfigError(name, f"must hold positive integers, got {value!r}")
    return int(value)


def _check_fraction(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1:
        raise ConfigError(name, f"must hold numbers in [0, 1), got {value!r}")
    return float(value)


def _per_layer(value: Any, num_layers: int, name: str, check) -> tuple:
    """One checked value per layer: a list/tuple of `num_layers` entries, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ConfigError(name, f"must list one entry per layer ({num_layers}), got {short(value)}")
        return tuple(check(name, v) for v in value)
    return (check(name, value),) * num_layers


def _listed(value: Any) -> Any:
    """JSON lists as tuples (hashable); anything else as is, for the config to check."""
    return tuple(value) if isinstance(value, list) else value


def _rope_theta(hf: dict[str, Any], layer_type: str, legacy_key: str, default: float) -> Any:
    """`rope_parameters[layer_type].rope_theta` (or the legacy top-level key); only default RoPE exists in Gemma 3n."""
    rope = given(hf, "rope_parameters", {})
    if not isinstance(rope, dict):
        raise ConfigError("rope_parameters", f"must be an object, got {short(rope)}")
    params = given(rope, layer_type, {})
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters.{layer_type}", f"must be an object, got {short(params)}")
    if params.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_parameters.{layer_type}", f"has unsupported rope_type {params.get('rope_type')!r}")
    return given(params, "rope_theta", given(hf, legacy_key, default))
