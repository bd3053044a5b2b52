"""Checkpoint formats as a registry: each format module registers how to recognise, open and write it.

A format is recognised from its files without reading tensor data (`detect`), opened as a
streaming `TensorSource` (`open`), and written from any source (`write`), all against the model
family's schema that the source's config selects. `convert`, `load`, `quantize` and name
resolution only call `detect_format`, `open_source` and `write_checkpoint`; a new format is one
module under `gemma_jax/checkpoint/` that calls `register` (and one import line in this package's
`__init__`). A path is expected to be claimed by one format, or by a format and the one it refines.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from gemma_jax.checkpoint.source import TensorSource
from gemma_jax.models import Config

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f32": "float32", "float32": "float32"}


@dataclasses.dataclass(frozen=True)
class WriteOptions:
    """What a writer may be asked for; each format uses the options that concern it."""

    overwrite: bool = False  # replace an existing destination (atomically)
    max_shard_bytes: int = 2**31  # safetensors shard size (hf, compressed-tensors)
    gguf_type: str | None = None  # GGUF tensor type (default: f32 or bf16 from the source's widest dtype)


@dataclasses.dataclass(frozen=True)
class Format:
    name: str  # as given to `--to` / `--from`
    summary: str  # one line for help texts
    detect: Callable[[Path], bool]  # whether a path holds this format (reads no tensor data)
    open: Callable[..., TensorSource] | None = None  # (path, *, dtype[, config]) -> source; None: not readable
    write: Callable[[Path, TensorSource, WriteOptions], Path] | None = None  # None: not writable
    takes_config: bool = False  # the files hold no config: `open` takes one (else it is found from the shapes)
    refines: str | None = None  # a format whose files this one's also are (compressed-tensors is also hf): wins over it


_FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add a format (called once by each format module as it is imported)."""
    if fmt.name in _FORMATS:
        raise ValueError(f"checkpoint format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def sources() -> tuple[str, ...]:
    """Names of the formats that can be read, in detection order."""
    return tuple(name for name, fmt in _FORMATS.items() if fmt.open is not None)


def targets() -> tuple[str, ...]:
    """Names of the formats that can be written."""
    return tuple(name for name, fmt in _FORMATS.items() if fmt.write is not None)


def get(name: str, *, to: bool = False) -> Format:
    known = targets() if to else sources()
    if name not in known:
        raise ValueError(f"unknown {'target' if to else 'source'} format {name!r}; choose one of {', '.join(known)}")
    return _FORMATS[name]


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of a checkpoint (one of `sources()`), from its files; reads no tensor data."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    claims = [fmt for fmt in _FORMATS.values() if fmt.open is not None and fmt.detect(p)]
    refined = {fmt.refines for fmt in claims}
    for fmt in claims:
        if fmt.name not in refined:
            return fmt.name
    if p.is_file():
        raise ValueError(f"{p} is a file but not a GGUF file; the other formats are directories")
    raise ValueError(
        f"cannot tell the format of {p}: expected a HF directory (config.json), one of our Orbax "
        "directories (gemma_config.json), a gemma-library Orbax checkpoint or a .gguf file"
    )


def cast_dtype(name: str | None) -> str | None:
    """"bf16"/"f32" (or the full names) -> the numpy dtype name readers cast to; None keeps the stored dtypes."""
    if name is not None and name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose bf16 or f32")
    return None if name is None else DTYPES[name]


def open_source(
    path: str | os.PathLike[str], *, format: str | None = None, dtype: str | None = None, config: Config | None = None
) -> TensorSource:
    """Open any supported checkpoint for streaming. `format` defaults to `detect_format(path)`; `dtype`
    ("bf16"/"f32", None: as stored) casts each tensor as read; `config` is for formats storing none."""
    fmt = get(format or detect_format(path))
    if config is not None and not fmt.takes_config:
        raise ValueError(f"a config can only be given for checkpoints that store none; {path} is {fmt.name}")
    options = {"config": config} if fmt.takes_config else {}
    return fmt.open(path, dtype=cast_dtype(dtype), **options)


def write_checkpoint(to: str, dst: str | os.PathLike[str], source: TensorSource, options: WriteOptions) -> Path:
    """Write `source` as a new checkpoint of format `to` at `dst` (staged, then renamed into place)."""
    return get(to, to=True).write(Path(dst), source, options)
