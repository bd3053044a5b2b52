"""Model configuration: one dataclass for every Gemma generation, differing only in flags.

Gemma 1, 2 and 3 (text) are the same transformer with switches (soft-caps, post-norms,
sliding-window layers, QK-norm, per-kind RoPE bases), so they share one config type and one
model file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

import configs

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
_HF_ARCHITECTURE = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
LAYER_KINDS = ("local", "global")
# Hugging Face `layer_types` entries and ours.
_HF_LAYER_KIND = {"sliding_attention": "local", "full_attention": "global"}


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Hyper-parameters of a Gemma decoder. Field names follow the papers, not Hugging Face."""

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_pattern", tuple(self.layer_pattern))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {self.model_type!r}; supported: {', '.join(MODEL_TYPES)}")
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.layer_pattern or set(self.layer_pattern) - set(LAYER_KINDS):
            raise ValueError(f"layer_pattern must list 'local'/'global' entries, got {self.layer_pattern!r}")
        if "local" in self.layer_pattern and not self.sliding_window:
            raise ValueError("layer_pattern has local layers but sliding_window is not set")

    def rope_for(self, kind: str) -> tuple[float, float]:
        """(base, linear scale) of the rotary embedding on a 'local' or 'global' layer."""
        if kind == "local":
            return (self.rope_local_base or self.rope_base), 1.0
        return self.rope_base, self.rope_scale

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """'local' (sliding window) or 'global' for each layer."""
        pattern = self.layer_pattern
        return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

    def replace(self, **changes: Any) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    # --- presets -------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GemmaConfig:
        """A shipped preset from `configs/models/NAME.yaml`, e.g. ``gemma2-9b``."""
        return cls(**{**yaml.safe_load(configs.model_preset_text(name)), **overrides})

    # --- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GemmaConfig:
        """Build from a Hugging Face `config.json` dict (GemmaForCausalLM / Gemma2ForCausalLM)."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(MODEL_TYPES)}")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu"):  # Gemma always uses the tanh GELU; old configs say "gelu"
            raise ValueError(f"unsupported activation {act!r} in config.json (Gemma uses gelu_pytorch_tanh)")
        rope = hf.get("rope_parameters") or {}
        global_rope, local_rope = rope.get("full_attention", rope), rope.get("sliding_attention", rope)
        for params in (global_rope, local_rope):
            if params.get("rope_type", "default") not in ("default", "linear"):
                raise ValueError(f"unsupported rope_type {params.get('rope_type')!r} in config.json")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        num_layers = hf["num_hidden_layers"]
        if model_type != "gemma":
            kinds = [_HF_LAYER_KIND[t] for t in hf.get("layer_types") or []] or [
                "local" if i % 2 == 0 else "global" for i in range(num_layers)
            ]
            extra = dict(
                layer_pattern=_shortest_period(kinds),
                sliding_window=hf.get("sliding_window") or 4096,
                attn_logit_softcap=hf.get("attn_logit_softcapping"),
                final_logit_softcap=hf.get("final_logit_softcapping"),
                use_post_norms=True,
                use_qk_norm=model_type == "gemma3_text",
                query_pre_attn_scalar=hf.get("query_pre_attn_scalar", head_dim),
            )
            if model_type == "gemma3_text":
                extra.update(rope_local_base=local_rope.get("rope_theta"), rope_scale=global_rope.get("factor", 1.0))
        else:
            extra = dict(layer_pattern=("global",), query_pre_attn_scalar=head_dim)
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            embed_dim=hf["hidden_size"],
            num_layers=num_layers,
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=head_dim,
            mlp_dim=hf["intermediate_size"],
            max_position=hf.get("max_position_embeddings", 8192),
            rope_base=global_rope.get("rope_theta") or hf.get("rope_theta") or 10_000.0,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            pad_id=hf.get("pad_token_id", 0),
            eos_id=_first(hf.get("eos_token_id", 1)),
            bos_id=hf.get("bos_token_id", 2),
            **extra,
        )

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
        return hf


def _shortest_period(kinds: list[str]) -> tuple[str, ...]:
    """The shortest pattern whose repetition gives `kinds` (["local","global"]*13 -> ("local","global"))."""
    for n in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % n] for i in range(len(kinds))):
            return tuple(kinds[:n])
    raise AssertionError("unreachable")


def _first(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else value
