"""Our Orbax checkpoints: the params pytree, our config and the tokenizer, written and read tensor by tensor.

A checkpoint directory holds:

    gemma_config.json  {"format": "gemma_jax", "version": 2, "config": {GemmaConfig fields},
                        "quant": null, or "w8a8"/"w8a16" for an int8 tree (see gemma_jax/quant.py)}
    tokenizer.model    the sentencepiece model, when the source had one
    params/            an Orbax checkpoint of the params pytree ({"embedder": {"embedding": ...},
                       "layer_0": {"attn": {"q": {"w": ...}}, ...}, ...}), as orbax's v1 API
                       lays it out (the tree itself in params/state/)

Writing streams: orbax-checkpoint 0.12.8's partial save (`orbax.checkpoint.experimental.v1.partial`)
adds subtrees to a pending checkpoint one call at a time and `finalize` merges them, so tensors
are saved in groups of about `GROUP_BYTES`, each in the background while the next is read. Host
memory peaks near twice the largest tensor: the tensor, plus the copy tensorstore makes while
writing it (measured: 2.6 GB for Gemma 2 2B, whose embedding is 1.18 GB). Arrays are
stored uncompressed (zstd saves little on bf16 weights and, measured here, doubled the peak
memory of a write) in chunks of at most `CHUNK_BYTES`, so restoring onto a mesh reads about
only each device's part.

Reading: `load_orbax` restores straight onto shards of any mesh, in any dtype (orbax reads each
device's part and casts); `orbax_source` streams one tensor at a time into another format.
Orbax silently returns the placeholder for a requested leaf the checkpoint lacks (v1
`partial_load` and v0 `partial_restore` alike), so every request is checked against the
checkpoint's metadata first.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import numpy.typing as npt
from orbax.checkpoint import v1 as ocp
from orbax.checkpoint.experimental.v1 import partial

from gemma_jax.checkpoint.hf import (
    TOKENIZER_FILE, Shape, TensorSource, set_path, check_tree, read_json, read_tokenizer, staged_dir,
)  # fmt: skip
from gemma_jax.checkpoint.names import ParamPath, check_layer_count, tensor_specs
from gemma_jax.config import GemmaConfig
from gemma_jax.tokenizer import Tokenizer

FORMAT, VERSION = "gemma_jax", 2  # 2: weights stored [out..., in...] (1: [in..., out...])
CONFIG_FILE = "gemma_config.json"
PARAMS_DIR = "params"
GROUP_BYTES = 256 * 2**20  # tensors per partial save: fewer calls (~0.1 s each) vs host memory
CHUNK_BYTES = 64 * 2**20  # storage chunks: what one device's read of a shard can cost at most
KeyPath = tuple[str, ...]  # a leaf's dict keys in an Orbax tree
Sharding = Callable[[ParamPath, Shape], jax.sharding.Sharding]


@dataclasses.dataclass(frozen=True)
class HostArray:
    """An abstract leaf that orbax restores as a numpy array: a shape and dtype, no sharding."""

    shape: Shape
    dtype: np.dtype


def is_orbax_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is one of our Orbax checkpoint directories (by its config file)."""
    return (Path(path) / CONFIG_FILE).is_file()


def save_orbax(path: str | os.PathLike[str], source: TensorSource, *, overwrite: bool = False) -> Path:
    """Write `source` as an Orbax checkpoint directory, streaming (see the module docstring).

    Params in memory go through `params_source(config, params)`; jax arrays, sharded ones
    included, are saved by orbax from their shards. One process: the temporary directory that
    becomes `path` is private to the caller.
    """
    leaves = ((spec.path, x) for spec, x in source)
    return write_orbax(path, source.config, leaves, source.tokenizer, overwrite=overwrite)


def write_orbax(
    path: str | os.PathLike[str],
    config: GemmaConfig,
    leaves: Iterable[tuple[ParamPath, Any]],
    tokenizer: bytes | None,
    *,
    quant: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write (param path, array) pairs as an Orbax checkpoint, in groups as they come; `quant` records an
    int8 tree's scheme (see `gemma_jax.quant`), whose leaves are checked against the model's int8 layout."""
    with staged_dir(path, overwrite=overwrite) as tmp:
        target = tmp / PARAMS_DIR
        with _save_options():
            writing = None  # the previous group's save, running while the next group is read
            group: dict[str, Any] = {}
            size = 0
            try:
                for p, x in leaves:
                    set_path(group, p, x)
                    size += x.nbytes
                    if size >= GROUP_BYTES:
                        writing = _save_async(writing, target, group)
                        group, size = {}, 0
                if group:
                    writing = _save_async(writing, target, group)
            finally:  # also on errors: nothing may still be writing when the temporary directory is removed
                if writing is not None:
                    writing.result()
            partial.finalize(target)
        _checked_metadata(target, config, quant)
        meta = {"format": FORMAT, "version": VERSION, "config": dataclasses.asdict(config), "quant": quant}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer)
    return Path(path)


def read_orbax_config(path: str | os.PathLike[str]) -> GemmaConfig:
    """The GemmaConfig of one of our Orbax checkpoint directories (reads only gemma_config.json)."""
    file, meta = _read_meta(path)
    try:
        return GemmaConfig(**meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: invalid config: {e}") from e


def stored_quant(path: str | os.PathLike[str]) -> str | None:
    """The int8 scheme ("w8a8"/"w8a16") of a quantized checkpoint of ours (`gemma-jax quantize`), else None."""
    from gemma_jax.kernels import SCHEMES

    file, meta = _read_meta(path)
    quant = meta.get("quant")
    if quant is not None and quant not in SCHEMES:
        raise ValueError(f"{file}: unknown quantization scheme {quant!r}; expected one of {', '.join(SCHEMES)}")
    return quant


def _read_meta(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; an Orbax checkpoint of ours needs a {CONFIG_FILE}")
    meta = read_json(file)
    if (meta.get("format"), meta.get("version")) != (FORMAT, VERSION):
        hint = "; version 1 stored weights [in, out]: convert the original checkpoint again" if meta.get("version") == 1 else ""
        raise ValueError(f"{file}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                         f"expected {FORMAT!r} version {VERSION}{hint}")  # fmt: skip
    return file, meta


def orbax_source(path: str | os.PathLike[str], *, dtype: npt.DTypeLike | None = None) -> TensorSource:
    """Open one of our (float) Orbax checkpoints for streaming; `dtype` casts each tensor as orbax reads it."""
    root = Path(path)
    config = read_orbax_config(root)
    quant = stored_quant(root)
    if quant is not None:
        raise ValueError(f"{root} holds int8 ({quant}) weights, which only gemma_jax.load restores; "
                         "convert the float checkpoint it was quantized from instead")  # fmt: skip
    ckpt = root / PARAMS_DIR
    stored = _checked_metadata(ckpt, config)
    dtypes = {p: np.dtype(dtype or leaf.dtype) for p, leaf in stored.items()}
    read = lambda spec: read_leaf(ckpt, spec.path, HostArray(spec.shape, dtypes[spec.path]))
    return TensorSource(config, dtypes, read, read_tokenizer(root / TOKENIZER_FILE, config), origin=str(root))


def load_orbax(
    path: str | os.PathLike[str], *, dtype: npt.DTypeLike | None = None, sharding: Sharding | None = None
) -> tuple[GemmaConfig, dict[str, Any], Tokenizer | None]:
    """Restore one of our Orbax checkpoints as (config, params, tokenizer), params straight onto devices.

    `sharding(path, shape)` gives each parameter's target sharding (default: the first local
    device); orbax reads only the parts each device holds, from whatever mesh the checkpoint
    was saved with. `dtype` casts on restore (None keeps the stored dtypes); a quantized
    checkpoint keeps its stored dtypes (int8 weights, float32 scales), whatever `dtype`.
    """
    root = Path(path)
    config = read_orbax_config(root)
    quant = stored_quant(root)
    dtype = None if quant is not None else dtype
    ckpt = root / PARAMS_DIR
    stored = _checked_metadata(ckpt, config, quant)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    where = sharding or (lambda _p, _s: device)
    abstract: dict[str, Any] = {}
    for p, leaf in stored.items():
        set_path(abstract, p, jax.ShapeDtypeStruct(leaf.shape, np.dtype(dtype or leaf.dtype), sharding=where(p, leaf.shape)))
    try:
        params = ocp.load(ckpt, abstract)
    except Exception as e:  # orbax/tensorstore report damaged data with assorted error types
        raise ValueError(f"{ckpt}: cannot restore the params ({type(e).__name__}: {e})") from e
    tokenizer = read_tokenizer(root / TOKENIZER_FILE, config)
    return config, params, None if tokenizer is None else Tokenizer(tokenizer)


# --- any Orbax PyTree checkpoint (ours, or Google's Flax ones) --------------------------------


def leaf_metadata(ckpt: Path) -> dict[KeyPath, HostArray]:
    """Every array leaf of an Orbax PyTree checkpoint: key path -> shape and stored dtype (no data read)."""
    if not ckpt.is_dir():
        raise FileNotFoundError(f"Orbax checkpoint directory {ckpt} does not exist")
    try:
        tree = ocp.metadata(ckpt).metadata
    except Exception as e:  # orbax signals a missing or damaged checkpoint with assorted error types
        raise ValueError(f"{ckpt}: not a readable Orbax checkpoint ({type(e).__name__}: {e})") from e
    out: dict[KeyPath, HostArray] = {}

    def walk(node: Any, keys: KeyPath) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, (*keys, str(k)))
        elif hasattr(node, "shape") and hasattr(node, "dtype"):
            out[keys] = HostArray(tuple(node.shape), np.dtype(node.dtype))
        else:
            raise ValueError(f"{ckpt}: leaf {'/'.join(keys)} is {type(node).__name__}, not an array")

    walk(tree, ())
    return out


def read_leaf(ckpt: Path, keys: KeyPath, leaf: HostArray) -> np.ndarray:
    """One array of an Orbax PyTree checkpoint, as numpy in `leaf.dtype` (the key path must exist:
    see the module docstring)."""
    request: dict[str, Any] = {}
    set_path(request, keys, leaf)
    options = ocp.Context()
    options.pytree.loading.partial_load = True
    try:
        with options:
            node = ocp.load(ckpt, request)
    except Exception as e:  # orbax/tensorstore report damaged data with assorted error types
        raise ValueError(f"{ckpt}: cannot read {'/'.join(keys)} ({type(e).__name__}: {e})") from e
    for key in keys:
        node = node[key]
    return node


def _checked_metadata(ckpt: Path, config: GemmaConfig, quant: str | None = None) -> dict[ParamPath, HostArray]:
    """The stored leaves, checked against the tree `config` (and `quant`) implies: names, shapes, int8-ness."""
    stored = leaf_metadata(ckpt)
    check_layer_count(config, len(stored), ckpt.parent / CONFIG_FILE)
    if quant is None:
        expected = {s.path: s.shape for s in tensor_specs(config).values()}
    else:
        from gemma_jax.quant import quantized_layout

        layout = quantized_layout(config, quant)
        expected = {p: tuple(leaf.shape) for p, leaf in layout.items()}
        wrong = [p for p, leaf in layout.items() if p in stored and (stored[p].dtype == np.int8) != (leaf.dtype == np.int8)]
        if wrong:
            raise ValueError(f"{ckpt}: {'/'.join(wrong[0])} is {stored[wrong[0]].dtype}, which the {quant} layout does not have")
    check_tree({k: v.shape for k, v in stored.items()}, expected, f"{ckpt} (config in {ckpt.parent / CONFIG_FILE})")
    return stored


def _save_async(previous: Any, target: Path, group: dict[str, Any]) -> Any:
    """Wait for the previous partial save, then start saving `group` in the background."""
    if previous is not None:
        previous.result()
    return partial.save_async(target, group)


def _save_options() -> ocp.Context:
    options = ocp.Context()
    options.array.saving.use_compression = False
    options.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    return options
