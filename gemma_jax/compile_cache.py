"""Where gemma_jax keeps files between runs, and the persistent XLA compilation cache there.

Compiling the prefill and decode programs is most of the time before the first token (25-65 s
for Gemma 3 270M on a 2-core CPU, minutes for large models on TPU), and every run of the same
command compiles the same programs. With the cache on, JAX stores each compiled executable under
`cache_root()/xla` keyed by the program, the backend, the devices and the jax version, and a
later run loads it instead of compiling.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def cache_root() -> Path:
    """`$GEMMA_JAX_CACHE`, else ~/.cache/gemma_jax: the demo checkpoint and compiled programs."""
    return Path(os.environ.get("GEMMA_JAX_CACHE") or Path.home() / ".cache" / "gemma_jax").expanduser()


def enable_compile_cache(directory: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache in `directory` (default `cache_root()/xla`).

    Every program is kept, however fast it compiled: a run compiles dozens of small ones, which
    together cost seconds. Call it before the first compilation; it returns the directory used.
    """
    path = Path(directory or cache_root() / "xla").expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return path
