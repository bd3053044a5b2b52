"""What every family's config shares: field checks, reading Hugging Face `config.json` values, the
layer pattern, presets and `replace` (a mixin), so that each family's config module holds only its fields."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import yaml

from gemma_jax import configs
from gemma_jax.models.family import ConfigError

LAYER_KINDS = ("local", "global")
HF_LAYER_KIND = {"sliding_attention": "local", "full_attention": "global"}  # Hugging Face `layer_types` -> ours


class FamilyConfig:
    """Methods every family's frozen config dataclass has (fields: num_layers, layer_pattern)."""

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """'local' (sliding window) or 'global' for each layer: `layer_pattern` repeated over the layers."""
        pattern = self.layer_pattern
        return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Any:
        """A shipped preset from `configs/models/NAME.yaml`, e.g. ``gemma2-9b`` or ``gemma3n-e2b``."""
        return cls(**{**yaml.safe_load(configs.model_preset_text(name)), **overrides})


def check_field(config: Any, name: str, kind: str) -> None:
    """Check one field of a config against its kind ("count", "optional count", "index", "token id",
    "positive", "optional positive", "flag"), making numpy integers plain ints; ConfigError names it."""
    value = getattr(config, name)
    if value is None and kind.startswith("optional"):
        return
    if kind == "flag":
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
    elif kind.endswith("positive"):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value < math.inf:
            raise ConfigError(name, f"must be a positive finite number, got {value!r}")
    else:  # counts, indices and token ids
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ConfigError(name, f"must be an integer, got {value!r}")
        object.__setattr__(config, name, int(value))  # numpy integers from metadata become plain ints
        if kind == "token id" and not 0 <= value < config.vocab_size:
            raise ConfigError(name, f"must be a token id below vocab_size={config.vocab_size}, got {value!r}")
        if kind == "index" and value < 0:
            raise ConfigError(name, f"must be a non-negative integer, got {value!r}")
        if kind.endswith("count") and value <= 0:
            raise ConfigError(name, f"must be a positive integer, got {value!r}")


def required(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(key, "is missing")
    return hf[key]


def given(hf: dict[str, Any], key: str, default: Any) -> Any:
    """hf[key], or `default` where the key is absent or null (never where it holds 0 or "")."""
    value = hf.get(key)
    return default if value is None else value


def layer_pattern(layer_types: Any, num_layers: Any) -> tuple[str, ...]:
    """Our repeating layer pattern from HF `layer_types` (Gemma 2's alternation when absent)."""
    if layer_types is None:
        return ("local", "global")
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ConfigError("layer_types", f"must list one entry per layer ({num_layers!r}), got {short(layer_types)}")
    bad = [t for t in layer_types if t not in HF_LAYER_KIND]
    if bad:
        raise ConfigError("layer_types", f"holds {short(bad[0])}; entries are {' or '.join(HF_LAYER_KIND)}")
    return _shortest_period([HF_LAYER_KIND[t] for t in layer_types])


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _shortest_period(kinds: list[str]) -> tuple[str, ...]:
    """The shortest pattern whose repetition gives `kinds` (["local","global"]*13 -> ("local","global")).

    Linear time (the Knuth-Morris-Pratt failure function: the longest proper border of the
    whole list is `len - period`), so a long `layer_types` list cannot stall loading."""
    if not kinds:
        return ()
    border = [0] * len(kinds)
    for i in range(1, len(kinds)):
        k = border[i - 1]
        while k and kinds[i] != kinds[k]:
            k = border[k - 1]
        border[i] = k + (kinds[i] == kinds[k])
    return tuple(kinds[: len(kinds) - border[-1]])


def first(value: Any) -> Any:
    """The first of a list of ids (HF allows several eos ids); an empty list is refused."""
    if isinstance(value, list):
        if not value:
            raise ConfigError("eos_token_id", "is an empty list")
        return value[0]
    return value
