"""Read and write Hugging Face Gemma checkpoints (`config.json` + safetensors) as our param pytree.

Loading converts tensors one at a time (peak host memory ~ one model + one tensor) and hands
each to an optional `put` hook, so a caller can place it on devices/shards as soon as it is read.
Every name and shape is validated from the safetensors headers before any tensor data is
read, so a bad checkpoint fails fast and nothing half-loaded is ever returned.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  -- registers "bfloat16" with numpy; safetensors needs it for BF16 tensors
import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gemma_jax.checkpoint.names import ParamPath, TensorSpec, tensor_specs
from gemma_jax.config import GemmaConfig

Put = Callable[[ParamPath, np.ndarray], Any]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TIED_HEAD = "lm_head.weight"  # Gemma ties the output projection to the embedding
EMBEDDING = "model.embed_tokens.weight"


def load_hf(
    path: str | os.PathLike[str],
    *,
    dtype: npt.DTypeLike | None = None,
    put: Put | None = None,
) -> tuple[GemmaConfig, dict[str, Any]]:
    """Load a HF Gemma 1/2 checkpoint directory as (config, params).

    `dtype` casts every tensor as it is read (None keeps the stored dtype). `put(path, array)`
    is applied to each converted tensor and its result stored in the tree (default: the array).
    """
    root = Path(path)
    config = read_hf_config(root)
    specs = tensor_specs(config)
    located = _locate_tensors(root)
    _validate(located, specs, config)
    if TIED_HEAD in located:
        _check_tied(located)
    cast = None if dtype is None else np.dtype(dtype)
    params: dict[str, Any] = {}
    for file in dict.fromkeys(file for file, _ in located.values()):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                if name == TIED_HEAD:
                    continue
                spec = specs[name]
                x = spec.to_ours(f.get_tensor(name))
                x = x if cast is None else x.astype(cast, copy=False)
                _set(params, spec.path, x if put is None else put(spec.path, x))
    return config, params


def save_hf(
    path: str | os.PathLike[str],
    config: GemmaConfig,
    params: Mapping[str, Any],
    *,
    max_shard_bytes: int = 2**31,
    tokenizer_model: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `params` as a HF checkpoint directory that `transformers.from_pretrained` loads.

    Everything goes into a temporary sibling directory that is renamed into place at the end,
    so readers never see a partial checkpoint. Host memory peaks at about one shard, since
    tensors (possibly on devices) are converted shard by shard.
    """
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; pass overwrite=True to replace it")
    specs = tensor_specs(config)
    leaves = _checked_leaves(params, specs)
    dtypes = {np.dtype(x.dtype) for x in leaves.values()}
    shards = _plan_shards(specs, leaves, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)
    ]
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        # Widest dtype: transformers casts everything to it on load, which then loses nothing.
        dtype_name = max(dtypes, key=lambda d: d.itemsize).name
        hf_config = {**config.to_hf(), "torch_dtype": dtype_name, "dtype": dtype_name}
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        for file, shard in zip(names, shards):
            tensors = {n: specs[n].to_hf(np.asarray(leaves[specs[n].path])) for n in shard}
            save_file(tensors, tmp / file, metadata={"format": "pt"})  # transformers checks "format"
            del tensors  # free this shard before converting the next
        if len(shards) > 1:
            index = {
                "metadata": {
                    "total_size": sum(x.nbytes for x in leaves.values()),
                    "total_parameters": sum(math.prod(x.shape) for x in leaves.values()),
                },
                "weight_map": {n: file for file, shard in zip(names, shards) for n in shard},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
        _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def read_hf_config(path: str | os.PathLike[str]) -> GemmaConfig:
    """The GemmaConfig of a HF checkpoint directory (reads only config.json)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    return _read_config(root / CONFIG_FILE)


# --- loading helpers -------------------------------------------------------------------------


def _read_config(file: Path) -> GemmaConfig:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; a HF checkpoint directory needs a {CONFIG_FILE}")
    hf = _read_json(file)
    try:
        return GemmaConfig.from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{file}: missing field {e}") from e
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e}") from e


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _shard_files(root: Path) -> list[Path]:
    """The weight files: those the index names if there is one, else the single file."""
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index} references shard {file.name}, which does not exist in {root}")
        return files
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    found = sorted(p.name for p in root.glob("*.safetensors"))
    raise FileNotFoundError(
        f"no safetensors weights in {root}: expected {SINGLE_FILE} or {INDEX_FILE}"
        + (f" (found {_listing(found)} without an index)" if found else "")
    )


def _locate_tensors(root: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """HF tensor name -> (file, shape), read from the safetensors headers only."""
    located: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in _shard_files(root):
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    if name in located:
                        raise ValueError(f"tensor {name} is in both {located[name][0].name} and {file.name}")
                    located[name] = (file, tuple(f.get_slice(name).get_shape()))
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file: {e}") from e
    return located


def _validate(
    located: Mapping[str, tuple[Path, tuple[int, ...]]], specs: Mapping[str, TensorSpec], config: GemmaConfig
) -> None:
    expected = {name: s.hf_shape for name, s in specs.items()} | {TIED_HEAD: specs[EMBEDDING].hf_shape}
    unexpected = [f"{name} (in {file.name})" for name, (file, _) in located.items() if name not in expected]
    if unexpected:
        raise ValueError(f"unexpected tensors for a {config.model_type} checkpoint: {_listing(unexpected)}")
    missing = [name for name in specs if name not in located]
    if missing:
        files = sorted({file.name for file, _ in located.values()})
        raise ValueError(f"missing tensors {_listing(missing)} in {_listing(files)}")
    for name, (file, shape) in located.items():
        if shape != expected[name]:
            raise ValueError(
                f"tensor {name} in {file} has shape {list(shape)}, but config.json implies {list(expected[name])}"
            )


def _check_tied(located: Mapping[str, tuple[Path, tuple[int, ...]]]) -> None:
    """An explicit lm_head is only acceptable if it is a copy of the embedding (tied weights)."""

    def read(name: str) -> np.ndarray:
        with safe_open(located[name][0], framework="numpy") as f:
            return f.get_tensor(name)

    if not np.array_equal(read(TIED_HEAD), read(EMBEDDING)):
        raise ValueError(
            f"tensor {TIED_HEAD} in {located[TIED_HEAD][0]} differs from {EMBEDDING}; "
            "Gemma ties them and untied output embeddings are not supported"
        )


def _set(tree: dict[str, Any], path: ParamPath, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _listing(items: Iterable[str], limit: int = 5) -> str:
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --- saving helpers --------------------------------------------------------------------------


def _checked_leaves(params: Mapping[str, Any], specs: Mapping[str, TensorSpec]) -> dict[ParamPath, Any]:
    """Our path -> array for every spec, refusing missing, extra or mis-shaped params."""
    leaves = dict(_flatten(params))
    wanted = {s.path: s for s in specs.values()}
    extra = ["/".join(p) for p in leaves if p not in wanted]
    if extra:
        raise ValueError(f"params have entries with no Hugging Face name: {_listing(extra)}")
    for p, spec in wanted.items():
        if p not in leaves:
            raise ValueError(f"params lack {'/'.join(p)} (HF {spec.hf_name})")
        if tuple(leaves[p].shape) != spec.shape:
            raise ValueError(f"params {'/'.join(p)} has shape {list(leaves[p].shape)}, config implies {list(spec.shape)}")
    return leaves


def _flatten(tree: Mapping[str, Any], prefix: ParamPath = ()) -> Iterable[tuple[ParamPath, Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _plan_shards(
    specs: Mapping[str, TensorSpec], leaves: Mapping[ParamPath, Any], max_shard_bytes: int
) -> list[list[str]]:
    """Greedy packing in HF order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        nbytes = leaves[spec.path].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename `tmp` to `dest`; an existing `dest` (overwrite=True) is moved aside first, then deleted."""
    if not dest.exists():
        tmp.rename(dest)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    dest.rename(trash / dest.name)
    tmp.rename(dest)
    shutil.rmtree(trash)
