"""Gemma 3n (text): AltUp streams, per-layer inputs, LAuReL, KV sharing and activation sparsity
(see model.py). `FAMILY` is everything the rest of gemma_jax knows about it. It does not scan its
layers (no `scanned_layers`: shapes vary per layer and later layers share earlier layers' KV), so a
runtime asked to scan runs it unrolled."""

from gemma_jax.models.family import Family
from gemma_jax.models.gemma3n import gguf_meta
from gemma_jax.models.gemma3n.config import Gemma3nConfig
from gemma_jax.models.gemma3n.model import Transformer, init_cache
from gemma_jax.models.kv_cache import CACHE_AXES
from gemma_jax.models.gemma3n.schema import HF_TEXT_PREFIX, SCHEMA, WHEN, dims, hf_unused

FAMILY = Family("gemma3n", Gemma3nConfig, Transformer, init_cache, CACHE_AXES, SCHEMA, WHEN, dims,
                hf_unused=hf_unused, hf_text_prefix=HF_TEXT_PREFIX, gguf=gguf_meta)  # fmt: skip

__all__ = ["FAMILY", "SCHEMA", "WHEN", "Gemma3nConfig", "Transformer", "dims", "init_cache"]
