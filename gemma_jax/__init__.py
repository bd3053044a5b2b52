"""gemma_jax: Gemma language models in JAX/Flax, built for TPU pods."""

from gemma_jax.api import Completion, Gemma, load
from gemma_jax.models.gemma import GemmaConfig

__all__ = ["Completion", "Gemma", "GemmaConfig", "load"]
