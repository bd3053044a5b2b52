"""Gemma 1/2/3 hyper-parameters <-> GGUF metadata, as llama.cpp's converter writes and reads them.

What GGUF does not record is set as llama.cpp sets it: the sliding-window layer pattern (Gemma 2:
every 2nd layer global; Gemma 3: every 6th), Gemma 3's local RoPE base (10000), and
`query_pre_attn_scalar` (head_dim, except embed/heads for the 27B layer counts). The format
(`checkpoint/gguf.py`) refuses to save a config that a reload would read back differently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gemma_jax.models.family import ConfigError
from gemma_jax.models.gemma.config import GemmaConfig

ARCHS = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}  # our model_type -> llama.cpp arch
_MODEL_TYPE = {arch: model_type for model_type, arch in ARCHS.items()}
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}  # llama.cpp set_swa_pattern(n): layer i is global iff i % n == n - 1
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}  # llama.cpp picks the 27B attention scale by layer count
_LOCAL_ROPE_BASE = 10_000.0  # llama.cpp's fixed rope_freq_base_train_swa for Gemma 3
_REQUIRED = object()
_GGUF_KEY = {  # our config field -> the metadata key it comes from, for error messages
    "vocab_size": "tokenizer.ggml.tokens", "embed_dim": "{arch}.embedding_length", "num_layers": "{arch}.block_count",
    "num_heads": "{arch}.attention.head_count", "num_kv_heads": "{arch}.attention.head_count_kv",
    "head_dim": "{arch}.attention.key_length", "mlp_dim": "{arch}.feed_forward_length",
    "max_position": "{arch}.context_length", "rope_base": "{arch}.rope.freq_base", "rope_scale": "{arch}.rope.scaling.factor",
    "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon", "sliding_window": "{arch}.attention.sliding_window",
    "attn_logit_softcap": "{arch}.attn_logit_softcapping", "final_logit_softcap": "{arch}.final_logit_softcapping",
    "pad_id": "tokenizer.ggml.padding_token_id", "eos_id": "tokenizer.ggml.eos_token_id", "bos_id": "tokenizer.ggml.bos_token_id",
}  # fmt: skip

def f32(x: float) -> float:
    """The shortest decimal that a float32 key holds, so 1e-6 reads back as 1e-6, not 9.9999997e-07."""
    return float(str(np.float32(x)))


def arch_keys(meta: Mapping[str, Any], arch: str) -> Callable[..., Any]:
    """get(name, default) -> the value of `{arch}.{name}`, or `default` where absent; without a default a
    missing key is a ValueError naming it."""

    def get(name: str, default: Any = _REQUIRED) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is _REQUIRED:
            raise ValueError(f"metadata lacks {arch}.{name}")
        return value

    return get


def config_from_metadata(meta: Mapping[str, Any]) -> GemmaConfig:
    """The config llama.cpp would run for this metadata (its defaults where a key is absent)."""
    arch = meta.get("general.architecture")
    if arch not in _MODEL_TYPE:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(_MODEL_TYPE)}")

    get = arch_keys(meta, arch)
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError("metadata has no tokenizer (tokenizer.ggml.tokens)")
    scaling, factor = get("rope.scaling.type", "none"), get("rope.scaling.factor", 1.0)
    if scaling not in ("none", "linear") or (factor != 1.0 and arch != "gemma3"):
        raise ValueError(f"unsupported RoPE scaling {scaling!r} x{factor} for {arch}")
    try:
        embed, heads, layers = get("embedding_length"), get("attention.head_count"), get("block_count")
        divisible = all(isinstance(n, int) and n > 0 for n in (embed, heads))  # else GemmaConfig says which is not
        head_dim = get("attention.key_length", embed // heads if divisible else None)
        # llama.cpp: Gemma 1 has no sliding window, Gemma 2 defaults to 4096, Gemma 3 without one is all global.
        window = get("attention.sliding_window", 4096 if arch == "gemma2" else 0) if arch in _SWA_PERIOD else 0
        period = _SWA_PERIOD[arch] if window else 1
        return GemmaConfig(
            model_type=_MODEL_TYPE[arch],
            vocab_size=len(meta["tokenizer.ggml.tokens"]),
            embed_dim=embed,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv", heads),
            head_dim=head_dim,
            mlp_dim=get("feed_forward_length"),
            query_pre_attn_scalar=embed // heads if divisible and layers == _LAYERS_27B.get(arch) else head_dim,
            layer_pattern=("local",) * (period - 1) + ("global",),
            sliding_window=window or None,
            attn_logit_softcap=get("attn_logit_softcapping", 50.0) if arch == "gemma2" else None,
            final_logit_softcap=get("final_logit_softcapping", 30.0 if arch == "gemma2" else 0.0) or None,
            use_post_norms=arch != "gemma",
            use_qk_norm=arch == "gemma3",
            max_position=get("context_length"),
            rope_base=get("rope.freq_base", 10_000.0),
            rope_local_base=_LOCAL_ROPE_BASE if arch == "gemma3" else None,
            rope_scale=factor,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
            pad_id=meta.get("tokenizer.ggml.padding_token_id", 0),
            eos_id=meta.get("tokenizer.ggml.eos_token_id", 1),
            bos_id=meta.get("tokenizer.ggml.bos_token_id", 2),
        )
    except ConfigError as e:  # name the metadata key, not our field
        raise ConfigError(_GGUF_KEY.get(e.field, e.field).format(arch=arch), e.problem) from None
    except TypeError as e:  # e.g. a per-layer array where Gemma has one number
        raise ValueError(f"metadata does not describe a Gemma model: {e}") from e


def metadata_for(config: GemmaConfig) -> dict[str, Any]:
    """The `{arch}.*` metadata llama.cpp's converter writes for this model (key names as in `gguf.Keys`);
    the format adds the general.* keys and the tokenizer."""
    arch = ARCHS[config.model_type]
    meta: dict[str, Any] = {
        f"{arch}.context_length": config.max_position,
        f"{arch}.embedding_length": config.embed_dim,
        f"{arch}.block_count": config.num_layers,
        f"{arch}.feed_forward_length": config.mlp_dim,
        f"{arch}.attention.head_count": config.num_heads,
        f"{arch}.attention.head_count_kv": config.num_kv_heads,
        f"{arch}.attention.key_length": config.head_dim,
        f"{arch}.attention.value_length": config.head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": f32(config.rms_norm_eps),
        f"{arch}.rope.freq_base": f32(config.rope_base),
    }
    if arch != "gemma" and config.sliding_window:
        meta[f"{arch}.attention.sliding_window"] = config.sliding_window
    caps = {"attn_logit_softcapping": config.attn_logit_softcap, "final_logit_softcapping": config.final_logit_softcap}
    meta |= {f"{arch}.{key}": f32(value) for key, value in caps.items() if value}
    if config.rope_scale != 1.0:
        meta |= {f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": f32(config.rope_scale)}
    return meta


def stored(source: Any) -> Any:
    """The `TensorSource` GGUF stores for `source`: the same (every Gemma tensor has a GGUF tensor of its shape)."""
    return source
