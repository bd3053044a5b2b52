"""`gemma-jax convert`: a checkpoint in one format to another, streamed tensor by tensor.

Formats (SRC's is detected; `--to` names DST's):

    hf                  Hugging Face directory: config.json, *.safetensors [+ index], tokenizer.model
    compressed-tensors  the same, int8 W8A8 (config.json has a compressed-tensors quantization_config)
    orbax               ours: gemma_config.json, params/ (Orbax), tokenizer.model (see checkpoint/orbax.py)
    gemma-lib           Google's `gemma` library / Kaggle Flax checkpoint (source only; no config inside)
    gguf                llama.cpp GGUF file (see checkpoint/gguf.py)

Every reader opens SRC as a `TensorSource` (validating names, shapes and dtypes first) and every
writer pulls one tensor at a time from it into a temporary sibling of DST, renamed into place at
the end; so memory stays near the largest tensor and DST is never seen half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gemma_jax.checkpoint.hf import (
    CONFIG_FILE, TensorSource, hf_source, read_hf_config, write_hf,
)  # fmt: skip
from gemma_jax.checkpoint.names import TensorSpec
from gemma_jax.checkpoint.staging import refuse_existing
from gemma_jax.config import GemmaConfig

SOURCES = ("hf", "compressed-tensors", "orbax", "gemma-lib", "gguf")
TARGETS = ("hf", "compressed-tensors", "orbax", "gguf")
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f32": "float32", "float32": "float32"}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
_GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a conversion did: the final line of `gemma-jax convert`."""

    tensors: int
    bytes: int  # tensor bytes read from SRC (after any dtype cast)
    seconds: float
    peak_rss: int  # bytes: the process's peak resident memory so far

    def __str__(self) -> str:
        rate = self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return (f"converted {self.tensors} tensors, {self.bytes / 1e9:.2f} GB in {self.seconds:.1f} s "
                f"({rate:.0f} MB/s); peak RSS {self.peak_rss / 1e9:.2f} GB")  # fmt: skip


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of a checkpoint (one of SOURCES), from its files; reads no tensor data."""
    from gemma_jax.checkpoint.compressed_tensors import is_compressed_tensors
    from gemma_jax.checkpoint.gemma_lib import is_gemma_lib_checkpoint
    from gemma_jax.checkpoint.orbax import is_orbax_checkpoint

    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == _GGUF_MAGIC:
                return "gguf"
        raise ValueError(f"{p} is a file but not a GGUF file; the other formats are directories")
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if is_orbax_checkpoint(p):
        return "orbax"
    if (p / CONFIG_FILE).is_file():
        return "compressed-tensors" if is_compressed_tensors(p) else "hf"
    if is_gemma_lib_checkpoint(p):
        return "gemma-lib"
    raise ValueError(
        f"cannot tell the format of {p}: expected a HF directory ({CONFIG_FILE}), one of our Orbax "
        "directories (gemma_config.json), a gemma-library Orbax checkpoint or a .gguf file"
    )


def open_source(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    dtype: str | None = None,
    config: GemmaConfig | None = None,
) -> TensorSource:
    """Open any supported checkpoint for streaming. `format` defaults to `detect_format(path)`;
    `dtype` ("bf16"/"f32", None: as stored) casts each tensor as read; `config` is for gemma-lib checkpoints."""
    format = format or detect_format(path)
    cast = _dtype(dtype)
    if config is not None and format != "gemma-lib":
        raise ValueError(f"a config can only be given for gemma-lib checkpoints; {path} is {format}")
    if format == "hf":
        return hf_source(path, dtype=cast)
    if format == "compressed-tensors":
        from gemma_jax.checkpoint.compressed_tensors import compressed_tensors_source

        return compressed_tensors_source(path, dtype=cast)
    if format == "orbax":
        from gemma_jax.checkpoint.orbax import orbax_source

        return orbax_source(path, dtype=cast)
    if format == "gemma-lib":
        from gemma_jax.checkpoint.gemma_lib import gemma_lib_source

        return gemma_lib_source(path, config=config, dtype=cast)
    if format == "gguf":
        from gemma_jax.checkpoint.gguf import gguf_source

        return gguf_source(path, dtype=cast)
    raise ValueError(f"unknown source format {format!r}; choose one of {', '.join(SOURCES)}")


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str,
    dtype: str | None = None,
    force: bool = False,
    source_format: str | None = None,
    config: GemmaConfig | None = None,
    max_shard_bytes: int = 2**31,
    gguf_type: str | None = None,
    quiet: bool = False,
) -> Summary:
    """Convert checkpoint `src` into a new checkpoint `dst` of format `to` (one of TARGETS).

    `dtype` ("bf16"/"f32"; None keeps the stored dtypes) casts every tensor; `force` replaces an
    existing `dst` (atomically: a failed or killed conversion leaves the old one). `gguf_type`
    picks GGUF's tensor type (default: bf16 or f32, from the dtype). Unless `quiet`, shows a
    progress bar (bytes/s) and prints the summary line to stderr.
    """
    from gemma_jax.checkpoint.resolve import checkpoint_path

    start = time.perf_counter()
    src, dst = checkpoint_path(src), Path(dst).expanduser()
    if to not in TARGETS:
        raise ValueError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")
    if gguf_type is not None and (to != "gguf" or gguf_type not in GGUF_TYPES):
        raise ValueError(f"gguf_type is for --to gguf, one of {', '.join(GGUF_TYPES)}; got {gguf_type!r}")
    refuse_existing(dst, force)
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ValueError(f"source {src} and destination {dst} overlap")
    source = open_source(src, format=source_format, dtype=dtype, config=config)
    from tqdm import tqdm

    with tqdm(total=source.nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{src.name} -> {to}",
              disable=quiet, file=sys.stderr) as bar:  # fmt: skip
        _write(to, dst, _metered(source, bar.update), force, max_shard_bytes, gguf_type)
    summary = Summary(len(source.specs), source.nbytes, time.perf_counter() - start, peak_rss())
    if not quiet:
        print(summary, file=sys.stderr)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `gemma-jax convert` options (for cli.py's subcommand)."""
    parser.add_argument("src", help="checkpoint to read: HF or compressed-tensors directory, our Orbax directory, "
                                    "gemma-library/Kaggle Flax checkpoint directory, .gguf file, or 'gemma3-270m'")  # fmt: skip
    parser.add_argument("dst", help="checkpoint to write (must not exist, unless --force)")
    parser.add_argument("--to", required=True, choices=TARGETS, help="format of DST")
    parser.add_argument("--dtype", choices=["bf16", "f32"], help="cast every tensor (default: keep the stored dtypes)")
    parser.add_argument("--force", action="store_true", help="replace an existing DST (atomically)")
    parser.add_argument("--from", dest="source_format", choices=SOURCES, help="format of SRC (default: detected)")
    parser.add_argument("--config", help="gemma-library checkpoints only: a model preset (e.g. gemma2-9b) or a HF "
                                         "config.json directory (default: the preset matching the tensor shapes)")  # fmt: skip
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size (hf, compressed-tensors)")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, help="GGUF tensor type (default: from --dtype or the source)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary line")


def run(args: argparse.Namespace) -> None:
    """Run `gemma-jax convert` from parsed `add_arguments` options."""
    host_only()
    config = None
    if args.config is not None:
        path = Path(args.config).expanduser()
        config = read_hf_config(path) if path.is_dir() else GemmaConfig.from_preset(args.config)
    convert(args.src, args.dst, to=args.to, dtype=args.dtype, force=args.force, source_format=args.source_format,
            config=config, max_shard_bytes=int(args.max_shard_gb * 2**30), gguf_type=args.gguf_type,
            quiet=args.quiet)  # fmt: skip


def host_only() -> None:
    """Run jax on the CPU unless JAX_PLATFORMS says otherwise: converting and quantizing need no
    accelerator, so they never grab a TPU another job holds."""
    if "JAX_PLATFORMS" not in os.environ:
        import jax

        jax.config.update("jax_platforms", "cpu")


def peak_rss() -> int:
    """This process's peak resident memory in bytes: Linux's VmHWM, which (unlike ru_maxrss) does not
    start from the RSS of the process that forked this one; ru_maxrss elsewhere."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _dtype(name: str | None) -> str | None:
    if name is not None and name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose bf16 or f32")
    return None if name is None else DTYPES[name]


def _metered(source: TensorSource, advance: Callable[[int], object]) -> TensorSource:
    """The same source, reporting each tensor's bytes to `advance` as it is read."""

    def read(spec: TensorSpec) -> Any:
        x = source.read(spec)
        advance(x.nbytes)
        return x

    return dataclasses.replace(source, read=read)


def _write(to: str, dst: Path, source: TensorSource, overwrite: bool, max_shard_bytes: int, gguf_type: str | None) -> None:
    if to == "hf":
        write_hf(dst, source, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    elif to == "compressed-tensors":
        from gemma_jax.checkpoint.compressed_tensors import save_compressed_tensors

        save_compressed_tensors(dst, source, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    elif to == "orbax":
        from gemma_jax.checkpoint.orbax import save_orbax

        save_orbax(dst, source, overwrite=overwrite)
    else:
        from gemma_jax.checkpoint.gguf import write_gguf

        widest = max((np.dtype(d) for d in source.dtypes.values()), key=lambda d: d.itemsize)
        kind = gguf_type or ("f32" if widest.itemsize == 4 else "bf16")
        write_gguf(dst, source, type=kind, overwrite=overwrite)
