"""Read and write Hugging Face Gemma checkpoints (`config.json` + safetensors) as our param pytree.

Both directions stream. Reading opens a checkpoint as a `TensorSource`, whose tensors are read
one at a time; writing pulls tensors from a source one at a time into safetensors files whose
headers are planned up front from the config. Peak host memory is therefore about one tensor,
whatever the model size. Every name, shape and dtype is validated from the safetensors headers
before any tensor data is read, so a bad checkpoint fails fast and nothing half-loaded is ever
returned; writes go to a temporary sibling directory that replaces the destination only when
complete. Other formats (Orbax, GGUF, compressed-tensors, Google's Flax checkpoints) produce and
consume the same `TensorSource`, which is how the converter joins any reader to any writer.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError, safe_open

from gemma_jax.checkpoint.registry import Format, register
from gemma_jax.checkpoint.source import FLOAT_DTYPES, Put, Shape, TensorSource, collect, params_source, set_path
from gemma_jax.checkpoint.staging import refuse_existing, staged_dir
from gemma_jax.models import Config, ConfigError, TensorSpec, config_from_hf, family_of, tensor_specs
from gemma_jax.models.family import check_layer_count, check_shapes, listing
from gemma_jax.tokenizer import BOS, EOS, PAD, UNK, Tokenizer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Without it, transformers loads tokenizer.model as a GemmaTokenizer that adds no <bos>.
TOKENIZER_CONFIG = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                    "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}  # fmt: skip
TIED_HEAD = "lm_head.weight"  # Gemma ties the output projection to the embedding
EMBEDDING = "model.embed_tokens.weight"
# safetensors' dtype names <-> numpy (the ones Gemma checkpoints, quantized ones included, use).
_ST_DTYPES = {
    "F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
    "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16), "I32": np.dtype(np.int32), "I64": np.dtype(np.int64),
}  # fmt: skip
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


def hf_source(path: str | os.PathLike[str], *, dtype: npt.DTypeLike | None = None) -> TensorSource:
    """Open a HF checkpoint directory for streaming; `dtype` casts each tensor as it is read.

    A multimodal checkpoint (config.json with a `text_config`, e.g. Gemma 3n's) is read as its
    language model: the family's text-stack tensors only, the vision and audio towers left unread
    (a note on stderr says so)."""
    root = Path(path)
    config = read_hf_config(root)
    stored = locate_tensors(root)
    check_layer_count(config, len(stored), root / CONFIG_FILE)
    names = text_tensor_names(config, stored, multimodal="text_config" in read_json(root / CONFIG_FILE))
    if len(names) < len(stored):
        print(f"note: {root} holds a multimodal model; reading its language model only "
              f"({len(stored) - len(names)} other tensors not read)", file=sys.stderr)  # fmt: skip
    located = {name: stored[names[name]] for name in names}
    specs = tensor_specs(config)
    _validate(located, specs, config)
    if TIED_HEAD in located:
        _check_tied(located, names)
    cast = None if dtype is None else np.dtype(dtype)
    dtypes = {s.path: cast or located[name].dtype for name, s in specs.items()}

    def read(spec: TensorSpec) -> np.ndarray:
        x = spec.to_ours(read_tensor(located[spec.hf_name].file, names[spec.hf_name]))
        return x if cast is None else x.astype(cast, copy=False)

    return TensorSource(config, dtypes, read, read_tokenizer(root / TOKENIZER_FILE, config), origin=str(root))


def text_tensor_names(config: Config, stored: Iterable[str], *, multimodal: bool) -> dict[str, str]:
    """The tensors of a checkpoint that the model reads: our HF name -> the name stored.

    A multimodal checkpoint keeps the text stack under the family's `hf_text_prefix` (renamed to
    `model.`; other tensors but the tied head are not read). Tensors the family declares unused
    (`hf_unused`) are dropped; everything else is kept, for validation to judge."""
    family = family_of(config)
    prefix = family.hf_text_prefix if multimodal else None
    names = {}
    for name in stored:
        canonical = name
        if prefix is not None:
            if not name.startswith(prefix) and name != TIED_HEAD:
                continue
            canonical = "model." + name.removeprefix(prefix) if name.startswith(prefix) else name
        if family.hf_unused is None or not family.hf_unused(config, canonical):
            names[canonical] = name
    return names


def params_from_hf(config: Config, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Our params pytree (numpy, our layout) from HF-named tensors in memory, e.g. a transformers
    `state_dict()` as numpy: names and shapes checked against the config as a checkpoint's are."""
    prefix = family_of(config).hf_text_prefix
    names = text_tensor_names(config, tensors, multimodal=prefix is not None and any(n.startswith(prefix) for n in tensors))
    specs = tensor_specs(config)
    found = {name: tuple(np.shape(tensors[stored])) for name, stored in names.items() if name != TIED_HEAD}
    check_shapes(found, {name: s.hf_shape for name, s in specs.items()}, f"{config.model_type} tensors")
    params: dict[str, Any] = {}
    for name, s in specs.items():
        set_path(params, s.path, s.to_ours(np.asarray(tensors[names[name]])))
    return params


def params_to_hf(config: Config, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """HF-named tensors (contiguous numpy, HF's order) of our params pytree: what a checkpoint would hold."""
    return {s.hf_name: s.to_hf(np.asarray(x)) for s, x in params_source(config, params)}


def load_hf(
    path: str | os.PathLike[str],
    *,
    dtype: npt.DTypeLike | None = None,
    put: Put | None = None,
) -> tuple[Config, dict[str, Any]]:
    """Load a HF Gemma 1/2/3 checkpoint directory as (config, params).

    `dtype` casts every tensor as it is read (None keeps the stored dtype). `put(path, array)`
    is applied to each converted tensor and its result stored in the tree (default: the array).
    """
    source = hf_source(path, dtype=dtype)
    return source.config, collect(source, put)


def save_hf(
    path: str | os.PathLike[str],
    config: Config,
    params: Mapping[str, Any],
    *,
    max_shard_bytes: int = 2**31,
    tokenizer_model: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `params` as a HF checkpoint directory that `transformers.from_pretrained` loads (see `write_hf`)."""
    dest = Path(path)
    refuse_existing(dest, overwrite)  # before reading anything
    tokenizer = None if tokenizer_model is None else Path(tokenizer_model).read_bytes()
    return write_hf(dest, params_source(config, params, tokenizer), max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def write_hf(
    path: str | os.PathLike[str], source: TensorSource, *, max_shard_bytes: int = 2**31, overwrite: bool = False
) -> Path:
    """Write a source as a HF checkpoint directory (sharded safetensors + index, config.json, and the
    tokenizer as tokenizer.model + tokenizer_config.json).

    Tensors are converted and written one at a time, so host memory peaks at about one tensor
    (params on devices are fetched one tensor at a time too), whatever `max_shard_bytes` is.
    """
    layout = {name: (s.hf_shape, np.dtype(source.dtypes[s.path])) for name, s in source.specs.items()}
    tensors = ((s.hf_name, s.to_hf(np.asarray(x))) for s, x in source)
    return write_hf_dir(path, hf_config(source.config, layout), layout, tensors, tokenizer=source.tokenizer,
                        max_shard_bytes=max_shard_bytes, overwrite=overwrite)  # fmt: skip


def expected_hf_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for checking a checkpoint is complete and matches `config`."""
    return {name: s.hf_shape for name, s in tensor_specs(config).items()}


def hf_config(config: Config, layout: Mapping[str, tuple[Shape, np.dtype]]) -> dict[str, Any]:
    """The config.json dict, with `torch_dtype` the widest float dtype among the tensors:
    transformers casts everything to it on load, which then loses nothing."""
    floats = [d for _, d in layout.values() if d in FLOAT_DTYPES]
    name = max(floats, key=lambda d: d.itemsize).name
    return {**config.to_hf(), "torch_dtype": name, "dtype": name}


def write_hf_dir(
    path: str | os.PathLike[str],
    config_json: Mapping[str, Any],
    layout: Mapping[str, tuple[Shape, np.dtype]],
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    tokenizer: bytes | None,
    max_shard_bytes: int,
    overwrite: bool,
) -> Path:
    """Write a safetensors checkpoint directory from a stream of (HF name, array) matching `layout`, in its order.

    `layout` (name -> shape, dtype) fixes the shard headers before any data is read; each streamed
    array must match its entry. Everything goes into a temporary sibling renamed into place at the end.
    """
    with staged_dir(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n")
        shards = _plan_shards(layout, max_shard_bytes)
        files = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)
        ]  # fmt: skip
        stream = iter(tensors)
        for file, shard in zip(files, shards):
            _write_safetensors(tmp / file, {name: layout[name] for name in shard}, stream)
        if next(stream, None) is not None:
            raise ValueError("more tensors than the layout lists")
        if len(shards) > 1:
            index = {
                "metadata": {
                    "total_size": sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values()),
                    "total_parameters": sum(math.prod(shape) for shape, _ in layout.values()),
                },
                "weight_map": {name: file for file, shard in zip(files, shards) for name in shard},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_bytes(tokenizer)
            (tmp / TOKENIZER_CONFIG_FILE).write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    return Path(path)


def read_hf_config(path: str | os.PathLike[str]) -> Config:
    """The model config of a HF checkpoint directory (reads only config.json)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    return _read_config(root / CONFIG_FILE)


def read_tensor(file: Path, name: str) -> np.ndarray:
    """One tensor from a safetensors file. The file is mapped only for this read, so its pages
    leave the process's resident memory as soon as the tensor is copied out."""
    with safe_open(file, framework="numpy") as f:
        return f.get_tensor(name)


def read_tokenizer(file: Path, config: Config) -> bytes | None:
    """The sentencepiece model at `file` (None if there is none), refused now, naming the file, if
    it does not parse or has more tokens than the model has embedding rows (ids past them would
    decode from garbage)."""
    if not file.is_file():
        return None
    model = file.read_bytes()
    try:
        size = Tokenizer(model).vocab_size
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    if size > config.vocab_size:
        raise ValueError(f"{file}: the tokenizer has {size} tokens, more than the model's vocab_size {config.vocab_size}")
    return model


# --- loading helpers -------------------------------------------------------------------------


class _Located(NamedTuple):
    file: Path
    shape: Shape
    dtype: np.dtype


def _read_config(file: Path) -> Config:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; a HF checkpoint directory needs a {CONFIG_FILE}")
    try:
        return config_from_hf(read_json(file))
    except ConfigError as e:
        raise ValueError(f"{file}: {e}") from e


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`, with errors that name the file."""
    try:
        data = json.loads(file.read_bytes())  # bytes: json detects UTF-8/16/32 and refuses bad encodings
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not valid UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _shard_files(root: Path) -> list[Path]:
    """The weight files: those the index names if there is one, else the single file."""
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = list(dict.fromkeys(_shard_path(root, index, name) for name in weight_map.values()))
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index} references shard {file.name}, which does not exist in {root}")
        return files
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    found = sorted(p.name for p in root.glob("*.safetensors"))
    raise FileNotFoundError(
        f"no safetensors weights in {root}: expected {SINGLE_FILE} or {INDEX_FILE}"
        + (f" (found {listing(found)} without an index)" if found else "")
    )


def _shard_path(root: Path, index: Path, name: Any) -> Path:
    """A shard named in the index, confined to the checkpoint directory: a relative path without
    ".." (checked on the name, not the resolved path, since hub caches link shards to blobs elsewhere)."""
    inside = isinstance(name, str) and name and not {"\\", "\0"} & set(name) and not PurePath(name).is_absolute()
    if not inside or ".." in PurePath(name).parts:
        raise ValueError(f"{index}: shard name {name!r} is not a file inside the checkpoint directory")
    return root / name


def locate_tensors(root: Path) -> dict[str, _Located]:
    """HF tensor name -> (file, shape, dtype), read from the safetensors headers only.

    safetensors checks each header against its file (offsets, sizes, truncation) on opening,
    so a corrupt file fails here, before any tensor data is read.
    """
    located: dict[str, _Located] = {}
    for file in _shard_files(root):
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    if name in located:
                        raise ValueError(f"tensor {name} is in both {located[name].file.name} and {file.name}")
                    info = f.get_slice(name)
                    dtype = _ST_DTYPES.get(info.get_dtype())
                    if dtype is None:
                        raise ValueError(f"tensor {name} in {file} has unsupported dtype {info.get_dtype()}")
                    located[name] = _Located(file, tuple(info.get_shape()), dtype)
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file: {e}") from e
    return located



def _validate(located: Mapping[str, _Located], specs: Mapping[str, TensorSpec], config: Config) -> None:
    expected = {name: s.hf_shape for name, s in specs.items()} | {TIED_HEAD: specs[EMBEDDING].hf_shape}
    unexpected = [f"{name} (in {loc.file.name})" for name, loc in located.items() if name not in expected]
    if unexpected:
        raise ValueError(f"unexpected tensors for a {config.model_type} checkpoint: {listing(unexpected)}")
    missing = [name for name in specs if name not in located]
    if missing:
        files = sorted({loc.file.name for loc in located.values()})
        raise ValueError(f"missing tensors {listing(missing)} in {listing(files)}")
    for name, loc in located.items():
        if loc.shape != expected[name]:
            raise ValueError(
                f"tensor {name} in {loc.file} has shape {list(loc.shape)}, but config.json implies {list(expected[name])}"
            )
        if loc.dtype not in FLOAT_DTYPES:
            raise ValueError(f"tensor {name} in {loc.file} is {loc.dtype.name}; expected float32, bfloat16 or float16")


def _check_tied(located: Mapping[str, _Located], names: Mapping[str, str]) -> None:
    """An explicit lm_head is only acceptable if it is a copy of the embedding (tied weights)."""
    head, embedding = (read_tensor(located[n].file, names[n]) for n in (TIED_HEAD, EMBEDDING))
    if not np.array_equal(head, embedding):
        raise ValueError(
            f"tensor {TIED_HEAD} in {located[TIED_HEAD].file} differs from {EMBEDDING}; "
            "Gemma ties them and untied output embeddings are not supported"
        )


# --- saving helpers --------------------------------------------------------------------------


def _plan_shards(layout: Mapping[str, tuple[Shape, np.dtype]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy packing in layout order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in layout.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_safetensors(file: Path, entries: Mapping[str, tuple[Shape, np.dtype]], stream: Iterator[tuple[str, np.ndarray]]) -> None:
    """Write one safetensors file tensor by tensor: the header (fixed by `entries`), then each
    array pulled from `stream` as it arrives, so the file never has to be assembled in memory."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers checks "format"
    offset = 0
    for name, (shape, dtype) in entries.items():
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors itself writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, (shape, dtype) in entries.items():
            got, x = next(stream, (None, None))
            if got != name or tuple(x.shape) != shape or x.dtype != dtype:
                found = "nothing" if x is None else f"{got} {x.dtype.name} {list(x.shape)}"
                raise ValueError(f"{file.name}: expected tensor {name} {dtype.name} {list(shape)}, got {found}")
            f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)


def _is_hf(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


register(Format(
    "hf", "Hugging Face directory: config.json, *.safetensors [+ index], tokenizer.model", _is_hf, hf_source,
    lambda dst, source, o: write_hf(dst, source, max_shard_bytes=o.max_shard_bytes, overwrite=o.overwrite),
))  # fmt: skip
