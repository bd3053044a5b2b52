"""Checkpoint conversion between Hugging Face safetensors and our parameter pytree."""

from gemma_jax.checkpoint.hf import load_hf, read_hf_config, save_hf
from gemma_jax.checkpoint.names import TensorSpec, expected_hf_shapes, tensor_specs

__all__ = ["TensorSpec", "expected_hf_shapes", "load_hf", "read_hf_config", "save_hf", "tensor_specs"]
