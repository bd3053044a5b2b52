"""Google's `gemma` library / Kaggle Flax checkpoints, read tensor by tensor into our layout.

They are Orbax PyTrees of the library's Flax modules, arranged one of two ways: "flat", as
released on Kaggle (`{"transformer/layer_0/attn/q_einsum": {"w": ...}, "transformer/layer_0/mlp/linear":
{"w": ...}}`), or "nested", as the library's `model.init()` and `save_params` write them
(`{"layer_0": {"attn": {"q_einsum": {"w": ...}}, "mlp": {"linear": ...}}}`; the MLP weights
have no "w"). Both are read through their metadata, one leaf at a time.

Layouts (N heads, K kv heads, D embed, H head_dim, F mlp, V vocab), from the library's modules:

    embedder/input_embedding     [V', D]     V' >= V: 256128 rows for 256000 tokens (padding rows, dropped)
    attn/q_einsum/w              [N, D, H]   with kv_einsum/w [2, K, D, H] (k, v), when K < N
    attn/qkv_einsum/w            [3, N, D, H] when K == N (Gemma 1 7B)
    attn/attn_vec_einsum/w       [N, H, D]   our o is [D, N, H]
    attn/_query_norm, _key_norm  [H]         Gemma 3 QK-norm
    mlp/gating_einsum            [2, D, F], or [2, F, D] ("transposed": Gemma 2 9B/27B); [0] gate, [1] up
    mlp/linear                   [F, D]      our down is [D, F]
    pre_attention_norm, post_attention_norm, pre_ffw_norm, post_ffw_norm, final_norm: scale [D]

Norm scales mean `1 + scale`, as in HF and ours, and RoPE is split-half in both, so nothing else
changes. The checkpoints store no config: pass one, or it is found among the shipped presets by
matching every tensor shape.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gemma_jax import configs
from gemma_jax.checkpoint.hf import TOKENIZER_FILE, Put, Shape, TensorSource, check_tree, collect, read_tokenizer
from gemma_jax.checkpoint.names import ParamPath, TensorSpec, tensor_specs
from gemma_jax.checkpoint.orbax import HostArray, KeyPath, leaf_metadata, read_leaf
from gemma_jax.config import GemmaConfig
from gemma_jax.tokenizer import Tokenizer

Transform = Callable[[np.ndarray], np.ndarray]
_NORMS = {"pre_attn_norm": "pre_attention_norm", "post_attn_norm": "post_attention_norm",
          "pre_ffw_norm": "pre_ffw_norm", "post_ffw_norm": "post_ffw_norm"}  # fmt: skip
_MLP_WEIGHTS = ("gating_einsum", "linear")  # stored without a "w" level in nested checkpoints


def is_gemma_lib_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` looks like an Orbax checkpoint of the gemma library's params (no data read)."""
    try:
        names = _google_names(leaf_metadata(Path(path)))
    except (ValueError, FileNotFoundError):
        return False
    return "embedder/input_embedding" in names


def gemma_lib_source(
    path: str | os.PathLike[str],
    *,
    config: GemmaConfig | None = None,
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
    config: GemmaConfig | None = None,
    dtype: npt.DTypeLike | None = None,
    put: Put | None = None,
) -> tuple[GemmaConfig, dict[str, Any], Tokenizer | None]:
    """Load a gemma-library checkpoint as (config, params, tokenizer); `put` as in `load_hf`."""
    source = gemma_lib_source(path, config=config, dtype=dtype)
    params = collect(source, put)
    return source.config, params, None if source.tokenizer is None else Tokenizer(source.tokenizer)


def match_preset(shapes: Mapping[str, Shape], where: str) -> GemmaConfig:
    """The one shipped preset (configs/models) whose tensor shapes are exactly `shapes`."""
    matches = {}
    for name in configs.model_preset_names():
        config = GemmaConfig.from_preset(name)
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


def _recipe(config: GemmaConfig, shapes: Mapping[str, Shape], where: str) -> dict[ParamPath, tuple[str, Transform]]:
    """For each of our params: the stored tensor it comes from and how to get it into our layout.

    Checks the stored names and shapes against `config` first (raising ValueError on any difference).
    Where the library has two layouts (qkv vs q + kv, transposed gating or not), `shapes` decides.
    """
    N, K, D, H, F, V = (config.num_heads, config.num_kv_heads, config.embed_dim, config.head_dim,
                        config.mlp_dim, config.vocab_size)  # fmt: skip
    rows = shapes.get("embedder/input_embedding", (0,))[0]
    if rows < V:
        raise ValueError(f"{where}: the embedding has {rows} rows, fewer than the config's vocab_size {V}")
    gating = shapes.get("layer_0/mlp/gating_einsum")
    transposed = gating == (2, F, D)
    if transposed and F == D:
        raise ValueError(f"{where}: mlp_dim == embed_dim, so the gating einsum's layout is ambiguous")
    fused = "layer_0/attn/qkv_einsum/w" in shapes
    heads = lambda t: t.transpose(0, 2, 1)  # [heads, D, H] -> [heads, H, D]
    gate_up = (lambda i: lambda x: x[i]) if transposed else (lambda i: lambda x: x[i].T)  # -> [F, D]

    expected: dict[str, Shape] = {"embedder/input_embedding": (rows, D), "final_norm/scale": (D,)}
    recipe: dict[ParamPath, tuple[str, Transform]] = {
        ("embedder", "embedding"): ("embedder/input_embedding", lambda x: x[:V]),
        ("final_norm", "scale"): ("final_norm/scale", lambda x: x),
    }
    for i in range(config.num_layers):
        g, ours = f"layer_{i}/", f"layer_{i}"
        if fused:
            expected[g + "attn/qkv_einsum/w"] = (3, N, D, H)
            qkv = [(g + "attn/qkv_einsum/w", lambda x, j=j: heads(x[j])) for j in range(3)]
        else:
            expected[g + "attn/q_einsum/w"] = (N, D, H)
            expected[g + "attn/kv_einsum/w"] = (2, K, D, H)
            qkv = [(g + "attn/q_einsum/w", heads)] + [(g + "attn/kv_einsum/w", lambda x, j=j: heads(x[j])) for j in range(2)]
        for name, entry in zip("qkv", qkv):
            recipe[(ours, "attn", name, "w")] = entry
        expected[g + "attn/attn_vec_einsum/w"] = (N, H, D)
        recipe[(ours, "attn", "o", "w")] = (g + "attn/attn_vec_einsum/w", lambda x: x.transpose(2, 0, 1))
        if config.use_qk_norm:
            for name, stored in (("q_norm", "_query_norm"), ("k_norm", "_key_norm")):
                expected[g + f"attn/{stored}/scale"] = (H,)
                recipe[(ours, "attn", name, "scale")] = (g + f"attn/{stored}/scale", lambda x: x)
        expected[g + "mlp/gating_einsum"] = (2, F, D) if transposed else (2, D, F)
        expected[g + "mlp/linear"] = (F, D)
        recipe[(ours, "mlp", "gate", "w")] = (g + "mlp/gating_einsum", gate_up(0))
        recipe[(ours, "mlp", "up", "w")] = (g + "mlp/gating_einsum", gate_up(1))
        recipe[(ours, "mlp", "down", "w")] = (g + "mlp/linear", lambda x: x.T)
        for name, stored in _NORMS.items():
            if config.use_post_norms or not name.startswith("post"):
                expected[g + f"{stored}/scale"] = (D,)
                recipe[(ours, name, "scale")] = (g + f"{stored}/scale", lambda x: x)
    check_tree(shapes, expected, f"{where} (as a {config.model_type} gemma-library checkpoint)")
    assert set(recipe) == {s.path for s in tensor_specs(config).values()}
    return recipe
