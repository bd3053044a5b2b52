"""`gemma-jax convert`: a checkpoint in one format to another, streamed tensor by tensor.

The formats are the checkpoint registry's (`gemma_jax/checkpoint/registry.py`: hf, compressed-tensors,
orbax, gemma-lib (source only), gguf); SRC's is detected, `--to` names DST's. Every reader opens SRC as a `TensorSource` (validating names, shapes and dtypes first) and every
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

from tqdm import tqdm

from gemma_jax.checkpoint import TensorSource, TensorSpec, WriteOptions, open_source, read_hf_config, sources, targets
from gemma_jax.checkpoint import write_checkpoint
from gemma_jax.checkpoint.resolve import checkpoint_path
from gemma_jax.checkpoint.staging import refuse_existing
from gemma_jax.models import Config, preset

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


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


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str,
    dtype: str | None = None,
    force: bool = False,
    source_format: str | None = None,
    config: Config | None = None,
    max_shard_bytes: int = 2**31,
    gguf_type: str | None = None,
    quiet: bool = False,
) -> Summary:
    """Convert checkpoint `src` into a new checkpoint `dst` of format `to` (one of `checkpoint.targets()`).

    `dtype` ("bf16"/"f32"; None keeps the stored dtypes) casts every tensor; `force` replaces an
    existing `dst` (atomically: a failed or killed conversion leaves the old one). `gguf_type`
    picks GGUF's tensor type (default: bf16 or f32, from the dtype). Unless `quiet`, shows a
    progress bar (bytes/s) and prints the summary line to stderr.
    """
    start = time.perf_counter()
    src, dst = checkpoint_path(src), Path(dst).expanduser()
    if to not in targets():
        raise ValueError(f"unknown target format {to!r}; choose one of {', '.join(targets())}")
    if gguf_type is not None and (to != "gguf" or gguf_type not in GGUF_TYPES):
        raise ValueError(f"gguf_type is for --to gguf, one of {', '.join(GGUF_TYPES)}; got {gguf_type!r}")
    refuse_existing(dst, force)
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ValueError(f"source {src} and destination {dst} overlap")
    source = open_source(src, format=source_format, dtype=dtype, config=config)
    with tqdm(total=source.nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{src.name} -> {to}",
              disable=quiet, file=sys.stderr) as bar:  # fmt: skip
        options = WriteOptions(overwrite=force, max_shard_bytes=max_shard_bytes, gguf_type=gguf_type)
        write_checkpoint(to, dst, _metered(source, bar.update), options)
    summary = Summary(len(source.specs), source.nbytes, time.perf_counter() - start, peak_rss())
    if not quiet:
        print(summary, file=sys.stderr)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `gemma-jax convert` options (for cli.py's subcommand)."""
    parser.add_argument("src", help="checkpoint to read: HF or compressed-tensors directory, our Orbax directory, "
                                    "gemma-library/Kaggle Flax checkpoint directory, .gguf file, or 'gemma3-270m'")  # fmt: skip
    parser.add_argument("dst", help="checkpoint to write (must not exist, unless --force)")
    parser.add_argument("--to", required=True, choices=targets(), help="format of DST")
    parser.add_argument("--dtype", choices=["bf16", "f32"], help="cast every tensor (default: keep the stored dtypes)")
    parser.add_argument("--force", action="store_true", help="replace an existing DST (atomically)")
    parser.add_argument("--from", dest="source_format", choices=sources(), help="format of SRC (default: detected)")
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
        config = read_hf_config(path) if path.is_dir() else preset(args.config)
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


def _metered(source: TensorSource, advance: Callable[[int], object]) -> TensorSource:
    """The same source, reporting each tensor's bytes to `advance` as it is read."""

    def read(spec: TensorSpec) -> Any:
        x = source.read(spec)
        advance(x.nbytes)
        return x

    return dataclasses.replace(source, read=read)
