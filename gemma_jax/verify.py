"""`gemma-jax verify CKPT`: is a checkpoint intact? One line of report, or an error naming what is damaged.

Our Orbax checkpoints carry checksums (see `gemma_jax.checkpoint.manifest`): every tensor is read
and checked, one at a time. Safetensors, GGUF and Google's Flax checkpoints carry none, so for
them only the structure is checked (names, shapes and dtypes from the headers against the config).
"""

from __future__ import annotations

import os

from gemma_jax.checkpoint import detect_format, open_source
from gemma_jax.checkpoint.orbax import verify_orbax
from gemma_jax.checkpoint.resolve import checkpoint_path


def verify(path: str | os.PathLike[str]) -> str:
    """The report line for checkpoint `path` (a path or a name `gemma_jax.load` knows); ValueError if damaged."""
    path = checkpoint_path(path)
    format = detect_format(path)
    if format == "orbax":
        return verify_orbax(path)
    source = open_source(path, format=format)
    return (f"{path}: {format}, {len(source.specs)} tensors ({source.nbytes / 1e6:,.1f} MB): structure OK; "
            f"{format} checkpoints carry no checksums, so the tensor data is not verified")  # fmt: skip
