"""Gemma 1, 2 and 3 (text): one decoder with switches (soft-caps, post-norms, sliding-window layers,
QK-norm, per-kind RoPE bases). `FAMILY` is everything the rest of gemma_jax knows about it."""

from gemma_jax.models.family import Family
from gemma_jax.models.gemma import gguf_meta, google
from gemma_jax.models.gemma.config import GemmaConfig
from gemma_jax.models.gemma.model import Transformer, init_cache, scanned_layers
from gemma_jax.models.kv_cache import CACHE_AXES
from gemma_jax.models.gemma.schema import SCHEMA, WHEN, dims

FAMILY = Family("gemma", GemmaConfig, Transformer, init_cache, CACHE_AXES, SCHEMA, WHEN, dims, gguf=gguf_meta, google=google,
                scanned_layers=scanned_layers)  # fmt: skip

__all__ = ["FAMILY", "GemmaConfig", "Transformer", "init_cache"]
