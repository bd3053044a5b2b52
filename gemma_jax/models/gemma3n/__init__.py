"""Gemma 3n (text): AltUp streams, per-layer inputs, LAuReL, KV sharing and activation sparsity
(see model.py). `FAMILY` is everything the rest of gemma_jax knows about it."""

from gemma_jax.models.family import Family
from gemma_jax.models.gemma3n.config import Gemma3nConfig
from gemma_jax.models.gemma3n.model import CACHE_AXES, Transformer, init_cache
from gemma_jax.models.gemma3n.schema import SCHEMA, WHEN, dims

FAMILY = Family("gemma3n", Gemma3nConfig, Transformer, init_cache, CACHE_AXES, SCHEMA, WHEN, dims)

__all__ = ["FAMILY", "SCHEMA", "WHEN", "Gemma3nConfig", "Transformer", "dims", "init_cache"]
