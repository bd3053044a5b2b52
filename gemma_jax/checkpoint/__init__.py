"""Checkpoint conversion between Hugging Face safetensors and our parameter pytree.

Every format is read as a `TensorSource` (config + tensors read one at a time) and written from
one; see `gemma_jax.convert` for the formats and the converter joining them.
"""

from gemma_jax.checkpoint.hf import (
    TensorSource, collect, hf_source, load_hf, params_source, read_hf_config, save_hf, write_hf,
)  # fmt: skip
from gemma_jax.checkpoint.names import TensorSpec, expected_hf_shapes, tensor_specs

__all__ = [
    "TensorSource", "TensorSpec", "collect", "expected_hf_shapes", "hf_source", "load_hf", "params_source",
    "read_hf_config", "save_hf", "tensor_specs", "write_hf",
]  # fmt: skip
