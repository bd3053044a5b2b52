"""Model families (one folder each, see `family.py`) and the lookups that pick a family for a config.

Generic code never names a family: it asks `family_of(config)` (or one of the shortcuts below)
for the config's modules, schema and cache. Adding a family is its folder plus one entry in
`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from gemma_jax import configs
from gemma_jax.models import gemma, gemma3n
from gemma_jax.models.family import Config, ConfigError, Family, Param, ParamPath, TensorSpec

FAMILIES: tuple[Family, ...] = (gemma.FAMILY, gemma3n.FAMILY)


def family_of(config: Config) -> Family:
    """The family whose config class `config` is an instance of."""
    for family in FAMILIES:
        if isinstance(config, family.config):
            return family
    raise TypeError(f"{type(config).__name__} is not the config of any model family")


def _family_for(model_type: Any) -> Family:
    for family in FAMILIES:
        if model_type in family.config.MODEL_TYPES:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.config.MODEL_TYPES)
    raise ConfigError("model_type", f"is {model_type!r}; supported: {known}")


def config_from_hf(hf: Mapping[str, Any]) -> Config:
    """A config from a Hugging Face `config.json` dict, of the family its `model_type` names."""
    return _family_for(hf.get("model_type")).config.from_hf(dict(hf))


def config_from_fields(fields: Mapping[str, Any]) -> Config:
    """A config from its own fields (our checkpoints' config file, a preset), by its `model_type`."""
    return _family_for(fields.get("model_type")).config(**fields)


def preset(name: str, **overrides: Any) -> Config:
    """A shipped model preset (`configs/models/NAME.yaml`, e.g. ``gemma2-9b``), of whichever family it is."""
    return config_from_fields({**yaml.safe_load(configs.model_preset_text(name)), **overrides})


def tensor_specs(config: Config) -> dict[str, TensorSpec]:
    """Every tensor of a checkpoint of `config`, keyed by HF name (see `Family.tensor_specs`)."""
    return family_of(config).tensor_specs(config)


def init_params(config: Config, rng: Any, param_dtype: Any = "float32", quant: str | None = None) -> dict:
    """Random parameters of `config`'s model (int8 placeholders with `quant`)."""
    return family_of(config).init_params(config, rng, param_dtype, quant)


def param_axes(config: Config, quant: str | None = None, scan: bool = False) -> dict:
    """The params pytree of `config`'s model with logical axis names as leaves (`scan`: the scanned model's)."""
    return family_of(config).param_axes(config, quant, scan)


def init_cache(config: Config, batch: int, max_len: int, dtype: Any = "float32", layout: Any = None) -> dict:
    """An empty KV cache of `config`'s model for `batch` rows of up to `max_len` tokens (on `layout` when traced)."""
    return family_of(config).init_cache(config, batch, max_len, dtype, layout)


def build(config: Config, **fields: Any) -> Any:
    """`config`'s Flax decoder module (fields: dtype, param_dtype, quant, remat, kernels)."""
    return family_of(config).module(config, **fields)


__all__ = [
    "FAMILIES", "Config", "ConfigError", "Family", "Param", "ParamPath", "TensorSpec", "build", "config_from_fields",
    "config_from_hf", "family_of", "init_cache", "init_params", "param_axes", "preset", "tensor_specs",
]  # fmt: skip
