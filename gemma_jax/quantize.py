"""`gemma-jax quantize`: any checkpoint -> an int8 Orbax checkpoint of ours (see `gemma_jax.quant` for the scheme)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict
from tqdm import tqdm

from gemma_jax.checkpoint import open_source
from gemma_jax.checkpoint.orbax import write_orbax
from gemma_jax.checkpoint.resolve import checkpoint_path
from gemma_jax.checkpoint.source import collect
from gemma_jax.checkpoint.staging import refuse_existing
from gemma_jax.convert import peak_rss
from gemma_jax.models import ParamPath
from gemma_jax.quant import SMOOTH_ALPHA, Array, check_scheme, quantized_layout, quantized_leaves, smoothing
from gemma_jax.tokenizer import Tokenizer


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    scheme: str,
    dtype: str = "bfloat16",
    calibration: str | os.PathLike[str] | None = None,
    calibration_tokens: int = 1024,
    ctx: int = 512,
    alpha: float = SMOOTH_ALPHA,
    force: bool = False,
    quiet: bool = False,
) -> str:
    """`gemma-jax quantize`: any checkpoint -> an int8 Orbax checkpoint of ours; returns the summary line.

    Without calibration the source streams one tensor at a time (memory: about the largest
    tensor). With a `calibration` text file (W8A8: SmoothQuant) the float model is held in memory
    to measure activations on `calibration_tokens` tokens of it, in rows of `ctx`. Non-int8
    leaves (norms) keep `dtype` (SmoothQuant's rescaled norms: float32); scales are float32.
    `gemma_jax.load(dst, mesh=...)` restores the result sharded.
    """
    start = time.perf_counter()
    refuse_existing(Path(dst), force)
    check_scheme(scheme, calibration is not None)  # before any tensor is read
    if scheme == "w8a8" and calibration is None and not quiet:
        print("note: W8A8 without --calibration skips SmoothQuant; on Gemma 3 270M that cost +2.9% perplexity "
              "instead of +0.8-1.4% (benchmarks/quant_quality.py)", file=sys.stderr)  # fmt: skip
    source = open_source(checkpoint_path(src), dtype=dtype)
    config, specs = source.config, {s.path: s for s in source.specs.values()}
    factors, norms = {}, {}
    if calibration is None:
        read = lambda path: source.read(specs[path])
    else:
        if source.tokenizer is None:
            raise ValueError(f"{src} has no tokenizer.model to encode the calibration text {calibration} with")
        ids = Tokenizer(source.tokenizer).encode(Path(calibration).read_text(encoding="utf-8"), add_bos=True)
        rows = min(calibration_tokens, len(ids)) // ctx
        if rows == 0:
            raise ValueError(f"calibration text {calibration} has {len(ids)} tokens; at least --ctx={ctx} are needed")
        params = collect(source, lambda _, x: jnp.asarray(x))
        factors, norms = smoothing(config, params, scheme, np.asarray(ids[: rows * ctx]).reshape(rows, ctx), alpha)
        read = flatten_dict(params).__getitem__
    leaves = quantized_leaves(config, read, scheme, factors, norms)
    total, written = len(quantized_layout(config, scheme)), [0]

    def metered(items: Iterator[tuple[ParamPath, Array]]) -> Iterator[tuple[ParamPath, Array]]:
        for path, x in tqdm(items, total=total, unit="tensor", desc=f"quantize {scheme}", disable=quiet, file=sys.stderr):
            written[0] += x.nbytes
            yield path, x

    write_orbax(dst, config, metered(leaves), source.tokenizer, quant=scheme, overwrite=force)
    seconds = time.perf_counter() - start
    line = (f"quantized {src} ({scheme}{', SmoothQuant' if calibration else ''}): {source.nbytes / 1e9:.2f} GB -> "
            f"{written[0] / 1e9:.2f} GB ({written[0] / source.nbytes:.0%}) in {seconds:.1f} s; peak RSS {peak_rss() / 1e9:.2f} GB")  # fmt: skip
    if not quiet:
        print(line, file=sys.stderr)
    return line
