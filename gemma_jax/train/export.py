"""The final export of a run: the merged model (LoRA folded in) in `gemma-jax convert`'s formats.

The weights go through the converter's own writers (`params_source` -> `write_hf` /
`save_orbax`), so an export is exactly what `gemma-jax convert` would write, tokenizer
included. They are cast to the export dtype on their devices and streamed to disk one tensor at
a time; only when the params span several hosts is each tensor gathered to every host first
(every process must take part in that), and then only the leader writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from gemma_jax import distributed
from gemma_jax.checkpoint import WriteOptions, params_source, write_checkpoint
from gemma_jax.models import Config
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.sharding import Layout, to_host


def export(
    directory: Path, formats: tuple[str, ...], config: Config, params: Any, layout: Layout, tokenizer: Tokenizer,
    dtype: str,
) -> dict[str, Path]:
    """Write `params` under directory/<format> for each of `formats` (replacing earlier exports)."""
    params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p))(params)
    if not all(x.is_fully_addressable for x in jax.tree.leaves(params)):
        replicate = jax.jit(lambda x: x, out_shardings=layout.replicated())
        params = jax.tree.map(lambda x: to_host(replicate(x)), params)
    written = {name: directory / name for name in formats}
    if distributed.is_leader():
        source = params_source(config, params, tokenizer.model_proto)
        for name, path in written.items():
            write_checkpoint(name, path, source, WriteOptions(overwrite=True))
    return written
