"""Google's `gemma` library / Kaggle Flax checkpoints, read tensor by tensor into our layout.

They are Orbax PyTrees of the library's Flax modules, arranged one of two ways: "flat", as
released on Kaggle (`{"transformer/layer_0/attn/q_einsum": {"w": ...}, "transformer/layer_0/mlp/linear":
{"w": ...}}`), or "nested", as the library's `model.init()` and `save_params` write them
(`{"layer_0": {"attn": {"q_einsum": {"w": ...}}, "mlp": {"linear": ...}}}`; the MLP weights
have no "w"). Both are read through their metadata, one leaf at a time.

How each library tensor becomes our parameters is the model family's knowledge
(`models/gemma/google.py`); this module finds and reads the tensors. The checkpoints store no
config: pass one, or it is found among the shipped presets by matching every tensor shape.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gemma_jax import configs
from gemma_jax.checkpoint.hf import TOKENIZER_FILE, read_tokenizer
from gemma_jax.checkpoint.orbax import HostArray, KeyPath, leaf_metadata, read_leaf
from gemma_jax.checkpoint.registry import Format, register
from gemma_jax.checkpoint.source import Put, Shape, TensorSource, collect
from gemma_jax.models import Config, TensorSpec, family_of, preset
from gemma_jax.tokenizer import Tokenizer

_MLP_WEIGHTS = ("gating_einsum", "linear")  # stored without a "w" level in nested checkpoints
_EMBEDDING = "embedder/input_embedding"  # every checkpoint of the library holds it


def is_gemma_lib_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` looks like an Orbax checkpoint of the gemma library's params (no data read)."""
    try:
        names = _google_names(leaf_metadata(Path(path)))
    except (ValueError, FileNotFoundError):
        return False
    return _EMBEDDING in names


def gemma_lib_source(
    path: str | os.PathLike[str],
    *,
    config: Config | None = None,
    dtype: npt.DTypeLike | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> TensorSource:
    """Open a gemma-library checkpoint for streaming into our layout.

    `config` defaults to the one shipped preset whose shapes match every tensor. `tokenizer`
    defaults to a tokenizer.model in the checkpoint directory or beside it (Kaggle's layout).
    """
    ckpt = Path(path)
    stored = _google_names(leaf_metadata(ckpt))
    shapes = {name: leaf.shape for name, (_, leaf) in stored.items()}
    config = config or match_preset(shapes, str(ckpt))
    recipe = _recipe(config, shapes, str(ckpt))
    cast = None if dtype is None else np.dtype(dtype)
    dtypes = {p: cast or stored[name][1].dtype for p, (name, _) in recipe.items()}

    @functools.lru_cache(maxsize=1)  # k/v and gate/up come from one stored tensor, read once for both
    def fetch(name: str) -> np.ndarray:
        keys, leaf = stored[name]
        return read_leaf(ckpt, keys, HostArray(leaf.shape, cast or leaf.dtype))

    def read(spec: TensorSpec) -> np.ndarray:
        name, transform = recipe[spec.path]
        return np.ascontiguousarray(transform(fetch(name)))

    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise FileNotFoundError(f"tokenizer model not found: {tokenizer}")
        tokenizer_model = read_tokenizer(Path(tokenizer), config)
    else:
        tokenizer_model = read_tokenizer(ckpt / TOKENIZER_FILE, config) or read_tokenizer(ckpt.parent / TOKENIZER_FILE, config)
    return TensorSource(config, dtypes, read, tokenizer_model, origin=str(ckpt))


def load_gemma_lib(
    path: str | os.PathLike[str],
    *,
    config: Config | None = None,
    dtype: npt.DTypeLike | None = None,
    put: Put | None = None,
) -> tuple[Config, dict[str, Any], Tokenizer | None]:
    """Load a gemma-library checkpoint as (config, params, tokenizer); `put` as in `load_hf`."""
    source = gemma_lib_source(path, config=config, dtype=dtype)
    params = collect(source, put)
    return source.config, params, None if source.tokenizer is None else Tokenizer(source.tokenizer)


def match_preset(shapes: Mapping[str, Shape], where: str) -> Config:
    """The one shipped preset (configs/models) whose tensor shapes are exactly `shapes`."""
    matches = {}
    for name in configs.model_preset_names():
        config = preset(name)
        if family_of(config).google is None:
            continue
        try:
            _recipe(config, shapes, where)
        except ValueError:
            continue
        matches[name] = config
    if len(matches) != 1:
        found = f"several presets match ({', '.join(matches)})" if matches else "no shipped preset matches its shapes"
        raise ValueError(f"{where}: gemma-library checkpoints store no config and {found}; pass a config")
    return next(iter(matches.values()))


def _google_names(leaves: Mapping[KeyPath, HostArray]) -> dict[str, tuple[KeyPath, HostArray]]:
    """Canonical '/'-joined names ('layer_0/attn/q_einsum/w', 'layer_0/mlp/linear') -> (key path, leaf),
    for flat and nested checkpoints alike."""
    out = {}
    for keys, leaf in leaves.items():
        parts = [p for key in keys for p in key.split("/")]
        if parts[0] == "transformer":
            parts = parts[1:]
        if len(parts) >= 2 and parts[-2] in _MLP_WEIGHTS and parts[-1] == "w":
            parts = parts[:-1]
        out["/".join(parts)] = (keys, leaf)
    return out


def _recipe(config: Config, shapes: Mapping[str, Shape], where: str) -> dict:
    """The family's recipe: for each of our params, the stored tensor it comes from and how to convert it."""
    family = family_of(config)
    if family.google is None:
        raise ValueError(f"{where}: {family.name} models have no gemma-library checkpoint layout")
    recipe = family.google.recipe(config, shapes, where)
    assert set(recipe) == {s.path for s in family.tensor_specs(config).values()}, "the recipe must cover the schema"
    return recipe


register(Format(
    "gemma-lib", "Google's `gemma` library / Kaggle Flax checkpoint (source only; no config inside)",
    is_gemma_lib_checkpoint, gemma_lib_source, takes_config=True,
))  # fmt: skip
