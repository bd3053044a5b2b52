"""Model configuration: one dataclass for every Gemma generation, differing only in flags.

Gemma 1, 2 and 3 (text) are the same transformer with switches (soft-caps, post-norms,
sliding-window layers, QK-norm, per-kind RoPE bases), so they share one config type and one
model file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


from gemma_jax.models.config_base import (
    LAYER_KINDS, FamilyConfig, check_field, first, given, layer_pattern, required, short,
)  # fmt: skip
from gemma_jax.models.family import ConfigError
from gemma_jax.models.heads import Head, head_of

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
_HF_ARCHITECTURE = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# What each field must hold; every config, from any file, is checked against this in one place.
_FIELD_KINDS = {
    "vocab_size": "count", "embed_dim": "count", "num_layers": "count", "num_heads": "count",
    "num_kv_heads": "count", "head_dim": "count", "mlp_dim": "count", "query_pre_attn_scalar": "positive",
    "sliding_window": "optional count", "attn_logit_softcap": "optional positive",
    "final_logit_softcap": "optional positive", "use_post_norms": "flag", "use_qk_norm": "flag",
    "max_position": "count", "rope_base": "positive", "rope_local_base": "optional positive",
    "rope_scale": "positive", "rms_norm_eps": "positive", "pad_id": "token id", "eos_id": "token id", "bos_id": "token id",
}  # fmt: skip
# Our field -> the Hugging Face config.json key it comes from, for error messages.
_HF_FIELD = {
    "embed_dim": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads", "mlp_dim": "intermediate_size", "layer_pattern": "layer_types",
    "attn_logit_softcap": "attn_logit_softcapping", "final_logit_softcap": "final_logit_softcapping",
    "max_position": "max_position_embeddings", "rope_base": "rope_theta",
    "rope_local_base": "rope_parameters.sliding_attention.rope_theta", "rope_scale": "rope_parameters.full_attention.factor",
    "pad_id": "pad_token_id", "eos_id": "eos_token_id", "bos_id": "bos_token_id",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GemmaConfig(FamilyConfig):
    """Hyper-parameters of a Gemma decoder. Field names follow the papers, not Hugging Face."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = MODEL_TYPES  # the Hugging Face model_type values of this family
    model_type: str  # "gemma" (Gemma 1), "gemma2" or "gemma3_text"
    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    query_pre_attn_scalar: float
    layer_pattern: tuple[str, ...] = ("global",)  # repeated over the layers: "local" = sliding window
    sliding_window: int | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    use_post_norms: bool = False  # Gemma 2/3: extra RMSNorm after attention and after the MLP
    use_qk_norm: bool = False  # Gemma 3: RMSNorm over head_dim on queries and keys
    max_position: int = 8192
    rope_base: float = 10_000.0  # global layers (and every layer unless rope_local_base is set)
    rope_local_base: float | None = None  # Gemma 3: sliding-window layers' own base
    rope_scale: float = 1.0  # linear position scaling on global layers (Gemma 3 4B+: 8)
    rms_norm_eps: float = 1e-6
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2
    head: Head = Head()  # what the last layer computes: the LM's vocab logits, or a classifier's scores

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_pattern", tuple(self.layer_pattern))
        object.__setattr__(self, "head", head_of(self.head))  # a dict where a stored config is read back
        if self.model_type not in MODEL_TYPES:
            raise ConfigError("model_type", f"is {self.model_type!r}; supported: {', '.join(MODEL_TYPES)}")
        for name, kind in _FIELD_KINDS.items():
            check_field(self, name, kind)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_heads", f"must be a multiple of num_kv_heads={self.num_kv_heads}, got {self.num_heads}")
        if not self.layer_pattern or set(self.layer_pattern) - set(LAYER_KINDS):
            raise ConfigError("layer_pattern", f"must list 'local'/'global' entries, got {self.layer_pattern!r}")
        if "local" in self.layer_pattern and not self.sliding_window:
            raise ConfigError("sliding_window", "is not set, but layer_pattern has local layers")
        self.head.architecture(self.model_type)  # one transformers has, so that it can be exported

    def rope_for(self, kind: str) -> tuple[float, float]:
        """(base, linear scale) of the rotary embedding on a 'local' or 'global' layer."""
        if kind == "local":
            return (self.rope_local_base or self.rope_base), 1.0
        return self.rope_base, self.rope_scale

    # --- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GemmaConfig:
        """Build from a Hugging Face `config.json` dict (GemmaForCausalLM / Gemma2ForCausalLM).

        Raises ConfigError naming the config.json key of any missing or invalid value. Nothing is
        built in proportion to `num_hidden_layers` here (it is checked against the tensors later).
        """
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError("model_type", f"is {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu"):  # Gemma always uses the tanh GELU; old configs say "gelu"
            raise ConfigError("hidden_activation", f"is {act!r}; Gemma uses gelu_pytorch_tanh")
        rope = given(hf, "rope_parameters", {})
        if not isinstance(rope, dict):
            raise ConfigError("rope_parameters", f"must be an object, got {short(rope)}")
        global_rope, local_rope = rope.get("full_attention", rope), rope.get("sliding_attention", rope)
        for key, params in (("rope_parameters.full_attention", global_rope), ("rope_parameters.sliding_attention", local_rope)):
            if not isinstance(params, dict):
                raise ConfigError(key, f"must be an object, got {short(params)}")
            if params.get("rope_type", "default") not in ("default", "linear"):
                raise ConfigError(key, f"has unsupported rope_type {params.get('rope_type')!r}")
        hidden, heads = required(hf, "hidden_size"), required(hf, "num_attention_heads")
        divisible = all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (hidden, heads))
        head_dim = given(hf, "head_dim", hidden // heads if divisible else None)
        num_layers = required(hf, "num_hidden_layers")
        head = Head.from_hf(hf)
        if model_type != "gemma":
            extra = dict(
                layer_pattern=layer_pattern(hf.get("layer_types"), num_layers),
                sliding_window=given(hf, "sliding_window", 4096),
                attn_logit_softcap=hf.get("attn_logit_softcapping"),
                final_logit_softcap=hf.get("final_logit_softcapping"),
                use_post_norms=True,
                use_qk_norm=model_type == "gemma3_text",
                query_pre_attn_scalar=given(hf, "query_pre_attn_scalar", head_dim),
            )
            if model_type == "gemma3_text":
                extra.update(rope_local_base=local_rope.get("rope_theta"), rope_scale=given(global_rope, "factor", 1.0))
        else:
            extra = dict(layer_pattern=("global",), query_pre_attn_scalar=head_dim)
        try:
            return cls(
                model_type=model_type,
                vocab_size=required(hf, "vocab_size"),
                embed_dim=hidden,
                num_layers=num_layers,
                num_heads=heads,
                num_kv_heads=given(hf, "num_key_value_heads", heads),
                head_dim=head_dim,
                mlp_dim=required(hf, "intermediate_size"),
                max_position=given(hf, "max_position_embeddings", 8192),
                rope_base=given(global_rope, "rope_theta", given(hf, "rope_theta", 10_000.0)),
                rms_norm_eps=given(hf, "rms_norm_eps", 1e-6),
                pad_id=given(hf, "pad_token_id", 0),
                eos_id=first(given(hf, "eos_token_id", 1)),
                bos_id=given(hf, "bos_token_id", 2),
                head=head,
                **extra,
            )
        except ConfigError as e:  # name the config.json key, not ours
            raise ConfigError(_HF_FIELD.get(e.field, e.field), e.problem) from None

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict that `transformers` loads as this model."""
        hf: dict[str, Any] = dict(
            architectures=[_HF_ARCHITECTURE[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.embed_dim,
            intermediate_size=self.mlp_dim,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_theta": self.rope_base, "rope_type": "default"},
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            bos_token_id=self.bos_id,
            tie_word_embeddings=True,
            hidden_act="gelu_pytorch_tanh",
            hidden_activation="gelu_pytorch_tanh",
        )
        if self.model_type != "gemma":
            hf.update(
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                sliding_window=self.sliding_window,
                layer_types=["sliding_attention" if k == "local" else "full_attention" for k in self.layer_kinds],
                attn_logit_softcapping=self.attn_logit_softcap,
                final_logit_softcapping=self.final_logit_softcap,
            )
        if self.model_type == "gemma3_text":
            (base, scale), (local_base, _) = self.rope_for("global"), self.rope_for("local")
            global_rope = {"rope_theta": base, "rope_type": "default"}
            if scale != 1.0:
                global_rope = {"rope_theta": base, "rope_type": "linear", "factor": scale}
            local_rope = {"rope_theta": local_base, "rope_type": "default"}
            hf["rope_parameters"] = {"full_attention": global_rope, "sliding_attention": local_rope}
        return {**hf, **self.head.to_hf(self.model_type)}
