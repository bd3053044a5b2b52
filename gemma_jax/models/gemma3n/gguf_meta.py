"""Gemma 3n (text) hyper-parameters <-> GGUF metadata (arch `gemma3n`), as llama.cpp's converter
(`Gemma3NModel` in convert_hf_to_gguf) writes them.

The converter records every Gemma 3n field except these three, which a reload sets to the released
models' values (and saving refuses a config with other ones): LAuReL's rank (64: llama.cpp takes it
from nowhere else), the AltUp coefficient clip (120) and the AltUp output scale (on). The per-layer
token table has as many rows as the vocabulary (llama.cpp indexes it by token id): `stored` makes it
so, the same function for every id, and `per_layer_vocab_size` reads back as `vocab_size`. Activation sparsity is stored as each layer's
normal quantile (-inf for a dense layer) and read back as the shortest fraction with that quantile.

llama.cpp itself (0.3.36, src/models/gemma3n.cpp) reads only the generic keys, the sliding-window
pattern and the local RoPE base: it hard-codes the rest to Gemma 3n E2B/E4B's values (4 AltUp
streams, stream 0 active, LAuReL rank 64, per-layer width 256, keys and values from the first 20
layers only, sparsity 0.95 on the first 10 layers, final soft-cap 30). A file of another config
loads here exactly but runs differently there, or not at all.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping
from typing import Any

import numpy as np

from gemma_jax.models.config_base import layer_pattern
from gemma_jax.models.family import ConfigError
from gemma_jax.models.gemma.gguf_meta import arch_keys, f32
from gemma_jax.models.gemma3n.config import MODEL_TYPE, Gemma3nConfig

ARCH = "gemma3n"
ARCHS = {MODEL_TYPE: ARCH}  # our model_type -> llama.cpp arch
_FIXED = dict(laurel_rank=64, altup_coef_clip=120.0, altup_correct_scale=True)  # not in GGUF: the released models'
_LLAMA_CPP_SWA_PERIOD = 5  # llama.cpp's pattern without the key: every fifth layer global
_PER_LAYER_TABLE = ("per_layer_embedder", "embedding")
_HF_KIND = {True: "sliding_attention", False: "full_attention"}  # a sliding_window_pattern entry as HF's layer type
_NORMAL = statistics.NormalDist()
_GGUF_KEY = {  # our config field -> the metadata key it comes from, for error messages
    "vocab_size": "tokenizer.ggml.tokens", "per_layer_vocab_size": "tokenizer.ggml.tokens",
    "embed_dim": "embedding_length", "num_layers": "block_count", "num_heads": "attention.head_count",
    "num_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length", "mlp_dim": "feed_forward_length",
    "layer_pattern": "attention.sliding_window_pattern", "layer_types": "attention.sliding_window_pattern", "sliding_window": "attention.sliding_window",
    "final_logit_softcap": "final_logit_softcapping", "max_position": "context_length", "rope_base": "rope.freq_base",
    "rope_local_base": "rope.freq_base_swa", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "per_layer_dim": "embedding_length_per_layer_input", "altup_num_inputs": "altup.num_inputs",
    "altup_active_idx": "altup.active_idx", "num_kv_shared_layers": "attention.shared_kv_layers",
    "activation_sparsity": "activation_sparsity_scale",
}  # fmt: skip


def config_from_metadata(meta: Mapping[str, Any]) -> Gemma3nConfig:
    """The config whose model llama.cpp's converter wrote this metadata for (llama.cpp's defaults where a key is absent)."""
    if meta.get("general.architecture") != ARCH:
        raise ValueError(f"unsupported architecture {meta.get('general.architecture')!r}; supported: {ARCH}")

    get = arch_keys(meta, ARCH)
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError("metadata has no tokenizer (tokenizer.ggml.tokens)")
    if get("rope.scaling.type", "none") != "none":
        raise ValueError(f"unsupported RoPE scaling {get('rope.scaling.type')!r} for {ARCH}")
    vocab = len(meta["tokenizer.ggml.tokens"])
    try:
        embed, heads = get("embedding_length"), get("attention.head_count")
        divisible = all(isinstance(n, int) and n > 0 for n in (embed, heads))  # else the config says which is not
        layers, swa = get("block_count"), get("attention.sliding_window_pattern", None)
        if swa is None:
            kinds: Any = ("local",) * (_LLAMA_CPP_SWA_PERIOD - 1) + ("global",)
        else:  # HF's layer types, so that the pattern is the shortest period, as from a config.json
            kinds = layer_pattern([_HF_KIND[bool(s)] for s in swa] if isinstance(swa, list) else swa, layers)
        return Gemma3nConfig(
            vocab_size=vocab,
            embed_dim=embed,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv", heads),
            head_dim=get("attention.key_length", embed // heads if divisible else None),
            mlp_dim=_listed(get("feed_forward_length")),
            layer_pattern=kinds,
            sliding_window=get("attention.sliding_window", None),
            final_logit_softcap=get("final_logit_softcapping", 0.0) or None,  # the converter omits it when unset
            max_position=get("context_length"),
            rope_base=get("rope.freq_base", 10_000.0),
            rope_local_base=get("rope.freq_base_swa", 10_000.0),
            rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
            per_layer_vocab_size=vocab,
            per_layer_dim=get("embedding_length_per_layer_input", 256),
            altup_num_inputs=get("altup.num_inputs", 4),
            altup_active_idx=get("altup.active_idx", 0),
            num_kv_shared_layers=get("attention.shared_kv_layers", 0),
            activation_sparsity=_sparsity(get("activation_sparsity_scale", [])),
            pad_id=meta.get("tokenizer.ggml.padding_token_id", 0),
            eos_id=meta.get("tokenizer.ggml.eos_token_id", 1),
            bos_id=meta.get("tokenizer.ggml.bos_token_id", 2),
            **_FIXED,
        )
    except ConfigError as e:  # name the metadata key, not our field
        key = _GGUF_KEY.get(e.field)
        raise ConfigError(e.field if key is None else key if key.startswith("tokenizer.") else f"{ARCH}.{key}", e.problem) from None
    except TypeError as e:  # e.g. an array where Gemma 3n has one number
        raise ValueError(f"metadata does not describe a Gemma 3n model: {e}") from e


def metadata_for(config: Gemma3nConfig) -> dict[str, Any]:
    """The `gemma3n.*` metadata llama.cpp's converter writes for this model (key names as in `gguf.Keys`);
    the format adds the general.* keys and the tokenizer."""
    meta: dict[str, Any] = {
        f"{ARCH}.block_count": config.num_layers,
        f"{ARCH}.context_length": config.max_position,
        f"{ARCH}.embedding_length": config.embed_dim,
        f"{ARCH}.feed_forward_length": list(config.mlp_dim),
        f"{ARCH}.attention.head_count": config.num_heads,
        f"{ARCH}.attention.head_count_kv": config.num_kv_heads,
        f"{ARCH}.rope.freq_base": f32(config.rope_base),
        f"{ARCH}.rope.freq_base_swa": f32(config.rope_local_base),
        f"{ARCH}.attention.layer_norm_rms_epsilon": f32(config.rms_norm_eps),
        f"{ARCH}.attention.key_length": config.head_dim,
        f"{ARCH}.attention.value_length": config.head_dim,
    }
    if config.final_logit_softcap:
        meta[f"{ARCH}.final_logit_softcapping"] = f32(config.final_logit_softcap)
    if config.sliding_window:
        meta[f"{ARCH}.attention.sliding_window"] = config.sliding_window
    return meta | {
        f"{ARCH}.altup.active_idx": config.altup_active_idx,
        f"{ARCH}.altup.num_inputs": config.altup_num_inputs,
        f"{ARCH}.embedding_length_per_layer_input": config.per_layer_dim,
        f"{ARCH}.attention.shared_kv_layers": config.num_kv_shared_layers,
        f"{ARCH}.activation_sparsity_scale": [_quantile(s) for s in config.activation_sparsity],
        f"{ARCH}.attention.sliding_window_pattern": [kind == "local" for kind in config.layer_kinds],
    }


def stored(source: Any) -> Any:
    """The `TensorSource` GGUF stores for `source`: its per-layer table with one row per token id, as llama.cpp
    indexes it. transformers reads row 0 for ids past the table, so the rows added are copies of row 0
    (llama.cpp's converter adds zeros) and rows past the vocabulary, which no id reads, are dropped: every
    id gets what it got. Only the config's `per_layer_vocab_size` changes (to `vocab_size`)."""
    config = source.config
    vocab, rows = config.vocab_size, config.per_layer_vocab_size
    if rows == vocab:
        return source
    original = source.specs

    def read(spec: Any) -> Any:
        x = source.read(original[spec.hf_name])
        if spec.path != _PER_LAYER_TABLE:
            return x
        x = np.asarray(x)
        return np.concatenate([x[:vocab], np.broadcast_to(x[:1], (vocab - min(rows, vocab), x.shape[1]))])

    return dataclasses.replace(source, config=dataclasses.replace(config, per_layer_vocab_size=vocab), read=read)


def _quantile(sparsity: float) -> float:
    """The converter's std multiplier Φ⁻¹(sparsity) as float32 (-inf for a dense layer)."""
    return float(np.float32(_NORMAL.inv_cdf(sparsity))) if sparsity > 0 else -math.inf


def _sparsity(scales: Any) -> Any:
    """Each layer's sparsity from its stored quantile: the shortest decimal fraction whose float32 quantile
    is the stored one within float32 rounding, 1e-6 (the converter computes it in float32 arithmetic, two
    steps off ours at 0.6; and Φ itself loses the decimal: 0.1 -> Φ(f32(Φ⁻¹(0.1))) = 0.09999999404)."""
    if not isinstance(scales, list):
        return scales  # the config refuses it
    return tuple(_fraction(s) if isinstance(s, float) else s for s in scales)


def _fraction(scale: float) -> float:
    exact = _NORMAL.cdf(scale) if not math.isnan(scale) else scale
    if not 0 < exact < 1:
        return exact
    for digits in range(1, 18):
        candidate = round(exact, digits)
        if 0 < candidate < 1 and math.isclose(_quantile(candidate), scale, rel_tol=1e-6, abs_tol=1e-7):
            return candidate
    return exact


def _listed(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
