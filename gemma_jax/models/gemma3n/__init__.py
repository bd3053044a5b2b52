"""Gemma 3n (text): its config, Flax decoder, KV cache and parameter schema (see model.py for the architecture)."""

from gemma_jax.models.gemma3n.config import Gemma3nConfig
from gemma_jax.models.gemma3n.model import Transformer, init_cache
from gemma_jax.models.gemma3n.schema import SCHEMA, WHEN, dims, params_from_hf, params_to_hf

__all__ = ["SCHEMA", "WHEN", "Gemma3nConfig", "Transformer", "dims", "init_cache", "params_from_hf", "params_to_hf"]
