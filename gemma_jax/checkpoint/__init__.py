"""Checkpoint formats, each read as a streaming `TensorSource` and written from one.

Importing this package registers every format (`registry.py`); `registry.open_source`,
`registry.detect_format` and `registry.write_checkpoint` are how the rest of gemma_jax reaches them.
"""

from gemma_jax.checkpoint import compressed_tensors, gemma_lib, gguf, hf, orbax  # noqa: F401  -- registers each format
from gemma_jax.checkpoint.hf import expected_hf_shapes, hf_source, load_hf, read_hf_config, save_hf, write_hf
from gemma_jax.checkpoint.registry import WriteOptions, detect_format, open_source, sources, targets, write_checkpoint
from gemma_jax.checkpoint.source import TensorSource, collect, params_source
from gemma_jax.models import TensorSpec, tensor_specs

__all__ = [
    "TensorSource", "TensorSpec", "WriteOptions", "collect", "detect_format", "expected_hf_shapes", "hf_source", "load_hf", "open_source",
    "params_source", "read_hf_config", "save_hf", "sources", "targets", "tensor_specs", "write_checkpoint", "write_hf",
]  # fmt: skip
