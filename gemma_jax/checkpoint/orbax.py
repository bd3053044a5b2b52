"""Our Orbax checkpoints: the params pytree, our config and the tokenizer, written and read tensor by tensor.

A checkpoint directory holds:

    gemma_config.json  {"format": "gemma_jax", "version": 2, "config": {Config fields},
                        "quant": null, or "w8a8"/"w8a16" for an int8 tree (see gemma_jax/quant.py)}
    tokenizer.model    the sentencepiece model, when the source had one
    checksums.json     each tensor's dtype, shape and checksum, and the SHA-256 of the two files above
                       (see checkpoint/manifest.py); checked on every load unless verify=False
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

Orbax is always handed absolute paths (`orbax_path`): it cannot work with relative ones.

Reading: `load_orbax` restores straight onto shards of any mesh, in any dtype (orbax reads each
device's part and casts); `orbax_source` streams one tensor at a time into another format.
Orbax silently returns the placeholder for a requested leaf the checkpoint lacks (v1
`partial_load` and v0 `partial_restore` alike), so every request is checked against the
checkpoint's metadata first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import operator
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import numpy.typing as npt
from orbax.checkpoint import v1 as ocp
from orbax.checkpoint.experimental.v1 import partial

from gemma_jax.checkpoint.hf import TOKENIZER_FILE, read_json, read_tokenizer
from gemma_jax.checkpoint.manifest import MANIFEST_FILE, Entry, Manifest, exact_widening, tensor_entry, write_manifest
from gemma_jax.checkpoint.registry import Format, register
from gemma_jax.checkpoint.source import Shape, TensorSource, set_path
from gemma_jax.checkpoint.staging import staged_dir
from gemma_jax.kernels import SCHEMES
from gemma_jax.models import Config, ParamPath, TensorSpec, config_from_fields, tensor_specs
from gemma_jax.models.family import check_layer_count, check_shapes, listing
from gemma_jax.quant import quantized_layout
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


def orbax_path(path: str | os.PathLike[str]) -> Path:
    """`path` as Orbax must be given it: absolute. Orbax 0.12.8 restores every leaf of a relative path
    as None and refuses to save to one, so every path this project hands to Orbax goes through here."""
    return Path(path).absolute()


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
    config: Config,
    leaves: Iterable[tuple[ParamPath, Any]],
    tokenizer: bytes | None,
    *,
    quant: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write (param path, array) pairs as an Orbax checkpoint, in groups as they come, with their checksums
    (see `gemma_jax.checkpoint.manifest`); `quant` records an int8 tree's scheme (see `gemma_jax.quant`),
    whose leaves are checked against the model's int8 layout."""
    with staged_dir(path, overwrite=overwrite) as tmp:
        target = tmp / PARAMS_DIR
        checksums: dict[str, Entry] = {}
        with _save_options():
            writing = None  # the previous group's save, running while the next group is read
            group: dict[str, Any] = {}
            size = 0
            try:
                for p, x in leaves:
                    checksums[tensor_name(p)] = tensor_entry(x)
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
            partial.finalize(orbax_path(target))
        _checked_metadata(target, config, quant)
        meta = {"format": FORMAT, "version": VERSION, "config": dataclasses.asdict(config), "quant": quant}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer)
        write_manifest(tmp, checksums, files=(CONFIG_FILE, TOKENIZER_FILE))
    return Path(path)


def read_orbax_config(path: str | os.PathLike[str]) -> Config:
    """The model config of one of our Orbax checkpoint directories (reads only gemma_config.json)."""
    file, meta = _read_meta(path)
    try:
        return config_from_fields(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: invalid config: {e}") from e


def stored_quant(path: str | os.PathLike[str]) -> str | None:
    """The int8 scheme ("w8a8"/"w8a16") of a quantized checkpoint of ours (`gemma-jax quantize`), else None."""
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


def orbax_source(path: str | os.PathLike[str], *, dtype: npt.DTypeLike | None = None, verify: bool = True) -> TensorSource:
    """Open one of our (float) Orbax checkpoints for streaming; `dtype` casts each tensor as it is read.
    With `verify`, each tensor is read as stored and checked against the checkpoint's checksums first."""
    root = Path(path)
    manifest = _manifest(root) if verify else None
    config = read_orbax_config(root)
    quant = stored_quant(root)
    if quant is not None:
        raise ValueError(f"{root} holds int8 ({quant}) weights, which only gemma_jax.load restores; "
                         "convert the float checkpoint it was quantized from instead")  # fmt: skip
    ckpt = root / PARAMS_DIR
    stored = _checked_metadata(ckpt, config, manifest=manifest)
    dtypes = {p: np.dtype(dtype or leaf.dtype) for p, leaf in stored.items()}

    def read(spec: TensorSpec) -> np.ndarray:
        if manifest is None:
            return read_leaf(ckpt, spec.path, HostArray(spec.shape, dtypes[spec.path]))
        x = read_leaf(ckpt, spec.path, stored[spec.path])
        manifest.check_tensor(tensor_name(spec.path), x)
        return x.astype(dtypes[spec.path], copy=False)

    return TensorSource(config, dtypes, read, read_tokenizer(root / TOKENIZER_FILE, config), origin=str(root))


def load_orbax(
    path: str | os.PathLike[str],
    *,
    dtype: npt.DTypeLike | None = None,
    sharding: Sharding | None = None,
    verify: bool = True,
) -> tuple[Config, dict[str, Any], Tokenizer | None]:
    """Restore one of our Orbax checkpoints as (config, params, tokenizer), params straight onto devices.

    `sharding(path, shape)` gives each parameter's target sharding (default: the first local
    device); orbax reads only the parts each device holds, from whatever mesh the checkpoint
    was saved with. `dtype` casts on restore (None keeps the stored dtypes); a quantized
    checkpoint keeps its stored dtypes (int8 weights, float32 scales), whatever `dtype`.
    With `verify`, every tensor is checked against the checkpoint's checksums on its devices;
    a tensor loaded narrower than stored (float32 stored, bfloat16 asked) is then restored as
    stored, checked and cast, so the whole stored tree is briefly in memory.
    """
    root = Path(path)
    manifest = _manifest(root) if verify else None
    config = read_orbax_config(root)
    quant = stored_quant(root)
    dtype = None if quant is not None else dtype
    ckpt = root / PARAMS_DIR
    stored = _checked_metadata(ckpt, config, quant, manifest=manifest)
    tokenizer = read_tokenizer(root / TOKENIZER_FILE, config)  # refused before any weight is read
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    where = sharding or (lambda _p, _s: device)
    wanted = {p: np.dtype(dtype or leaf.dtype) for p, leaf in stored.items()}
    checkable = lambda p: manifest is None or exact_widening(stored[p].dtype, wanted[p])
    abstract: dict[str, Any] = {}
    for p, leaf in stored.items():
        restored = wanted[p] if checkable(p) else leaf.dtype
        set_path(abstract, p, jax.ShapeDtypeStruct(leaf.shape, restored, sharding=where(p, leaf.shape)))
    try:
        params = ocp.load(orbax_path(ckpt), abstract)
    except Exception as e:  # orbax/tensorstore report damaged data with assorted error types
        raise ValueError(f"{ckpt}: cannot restore the params ({_one_line(e)})") from e
    if manifest is not None:
        for p in stored:
            x = functools.reduce(operator.getitem, p, params)
            manifest.check_tensor(tensor_name(p), x)
            if not checkable(p):
                set_path(params, p, x.astype(wanted[p]))
    return config, params, None if tokenizer is None else Tokenizer(tokenizer)


def verify_orbax(path: str | os.PathLike[str]) -> str:
    """Check every tensor of one of our Orbax checkpoints against its checksums, one tensor at a time;
    the report line, or ValueError naming the checkpoint and every damaged tensor."""
    root = Path(path)
    manifest = _manifest(root)
    config = read_orbax_config(root)
    ckpt = root / PARAMS_DIR
    stored = _checked_metadata(ckpt, config, stored_quant(root), manifest=manifest)
    nbytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in stored.values())
    if manifest is None:
        return (f"{root}: {len(stored)} tensors, {nbytes / 1e6:,.1f} MB: structure OK; no {MANIFEST_FILE} (written "
                "before gemma_jax kept checksums), so the tensor data is not verified")  # fmt: skip
    bad = [tensor_name(p) for p, leaf in stored.items() if not manifest.matches(tensor_name(p), read_leaf(ckpt, p, leaf))]
    if bad:
        raise ValueError(f"{root}: checkpoint is damaged: {len(bad)} of {len(stored)} tensors do not match their "
                         f"checksums: {listing(bad)}")  # fmt: skip
    return f"{root}: OK, {len(stored)} tensors ({nbytes / 1e6:,.1f} MB) and {len(manifest.files)} files match their checksums"


def tensor_name(path: ParamPath) -> str:
    """A param's name in messages and the checksum manifest: its path joined by '/'."""
    return "/".join(path)


def _manifest(root: Path) -> Manifest | None:
    """`root`'s checksum manifest, its small files (config, tokenizer) already checked; None if it has none."""
    manifest = Manifest.read(root, hint=" (verify=False / --no-verify loads it anyway)")
    if manifest is not None:
        manifest.check_files()
    return manifest


# --- any Orbax PyTree checkpoint (ours, or Google's Flax ones) --------------------------------


def leaf_metadata(ckpt: Path) -> dict[KeyPath, HostArray]:
    """Every array leaf of an Orbax PyTree checkpoint: key path -> shape and stored dtype (no data read)."""
    if not ckpt.is_dir():
        raise FileNotFoundError(f"Orbax checkpoint directory {ckpt} does not exist")
    _drop_late_orbax_callbacks()
    try:
        with _quiet_absl():  # a damaged tree is reported below, in one line
            tree = ocp.metadata(orbax_path(ckpt)).metadata
    except Exception as e:  # orbax signals a missing or damaged checkpoint with assorted error types
        raise ValueError(f"{ckpt}: not a readable Orbax checkpoint ({_one_line(e)})") from e
    out: dict[KeyPath, HostArray] = {}

    def walk(node: Any, keys: KeyPath) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, (*keys, str(k)))
        elif hasattr(node, "shape") and hasattr(node, "dtype"):
            out[keys] = HostArray(tuple(node.shape), np.dtype(node.dtype))
        else:
            what = f"tensor {'/'.join(keys)} has no array metadata" if keys else "Orbax reads no tree from its metadata"
            raise ValueError(f"{ckpt}: damaged Orbax checkpoint: {what} (found {type(node).__name__})")

    walk(tree, ())
    return out


@contextlib.contextmanager
def _quiet_absl():
    """Orbax logs (through absl) a multi-line warning with the tensorstore spec when it cannot read a
    checkpoint's metadata, then returns None; the caller turns that into its one-line error."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _drop_late_orbax_callbacks() -> None:
    """Orbax reads metadata on a private uvloop loop, which it closes when the read fails (a damaged
    checkpoint); the tensorstore reads still in flight then complete into the closed loop, and each
    prints "RuntimeError: Event loop is closed" at any later moment, up to exit, around our one-line
    error. Installed before the read (the first can come before it returns), it drops exactly those
    errors; every other unraisable error still reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loops", False):
        return

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loops = True
    sys.unraisablehook = hook


def read_leaf(ckpt: Path, keys: KeyPath, leaf: HostArray) -> np.ndarray:
    """One array of an Orbax PyTree checkpoint, as numpy in `leaf.dtype` (the key path must exist:
    see the module docstring)."""
    request: dict[str, Any] = {}
    set_path(request, keys, leaf)
    options = ocp.Context()
    options.pytree.loading.partial_load = True
    try:
        with options:
            node = ocp.load(orbax_path(ckpt), request)
    except Exception as e:  # orbax/tensorstore report damaged data with assorted error types
        raise ValueError(f"{ckpt}: cannot read {'/'.join(keys)} ({_one_line(e)})") from e
    for key in keys:
        node = node[key]
    return node


def _checked_metadata(
    ckpt: Path, config: Config, quant: str | None = None, *, manifest: Manifest | None = None
) -> dict[ParamPath, HostArray]:
    """The stored leaves, checked against the tree `config` (and `quant`) implies: names, shapes, int8-ness;
    and against the checksum `manifest`'s names, shapes and dtypes."""
    stored = leaf_metadata(ckpt)
    check_layer_count(config, len(stored), ckpt.parent / CONFIG_FILE)
    if manifest is not None:
        manifest.check_layout({tensor_name(p): (leaf.shape, leaf.dtype) for p, leaf in stored.items()})
    if quant is None:
        expected = {s.path: s.shape for s in tensor_specs(config).values()}
    else:
        layout = quantized_layout(config, quant)
        expected = {p: tuple(leaf.shape) for p, leaf in layout.items()}
        wrong = [p for p, leaf in layout.items() if p in stored and (stored[p].dtype == np.int8) != (leaf.dtype == np.int8)]
        if wrong:
            raise ValueError(f"{ckpt}: {'/'.join(wrong[0])} is {stored[wrong[0]].dtype}, which the {quant} layout does not have")
    check_shapes({k: v.shape for k, v in stored.items()}, expected, f"{ckpt} (config in {ckpt.parent / CONFIG_FILE})")
    return stored


def _save_async(previous: Any, target: Path, group: dict[str, Any]) -> Any:
    """Wait for the previous partial save, then start saving `group` in the background."""
    if previous is not None:
        previous.result()
    return partial.save_async(orbax_path(target), group)


def _save_options() -> ocp.Context:
    options = ocp.Context()
    options.array.saving.use_compression = False
    options.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    return options


def _one_line(e: BaseException) -> str:
    """An Orbax/tensorstore error as one line of a message of ours (theirs can span many)."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:500]


register(Format(
    "orbax", "ours: gemma_config.json, params/ (Orbax), tokenizer.model (see checkpoint/orbax.py)", is_orbax_checkpoint,
    orbax_source, lambda dst, source, o: save_orbax(dst, source, overwrite=o.overwrite),
))  # fmt: skip
