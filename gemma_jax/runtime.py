"""The one static key of every compiled program: model config, compute dtype, quantization scheme,
and the `Kernels` value (int8 and attention backends, interpret mode, mesh layout).

Every `jax.jit` in gemma_jax takes a `Runtime` as its static argument and builds its module from
it, so what a program computes is a function of its arguments alone: calling the same model with
another backend or mesh compiles (or reuses) the program for that runtime, never a stale one
traced under different global settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gemma_jax.kernels import Kernels
from gemma_jax.models import Config, build, family_of
from gemma_jax.sharding import Layout


@dataclasses.dataclass(frozen=True)
class Runtime:
    config: Config
    dtype: str  # compute (activation and cache) dtype name
    quant: str | None = None  # "w8a8" / "w8a16" for int8 params (see gemma_jax.quant)
    kernels: Kernels = Kernels()

    @classmethod
    def create(
        cls, config: Config, dtype: Any = jnp.float32, *, layout: Layout | None = None, quant: str | None = None,
        int8: str | None = None, attention: str | None = None, interpret: bool | None = None,
    ) -> Runtime:  # fmt: skip
        """A runtime with the platform's kernel defaults (see `Kernels.for_platform`), overridable here."""
        kernels = Kernels.for_platform(layout, int8=int8, attention=attention, interpret=interpret)
        return cls(config, jnp.dtype(dtype).name, quant, kernels)

    @property
    def layout(self) -> Layout | None:
        return self.kernels.layout

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def model(self, **fields: Any) -> Any:
        """The family's Flax decoder for this runtime (extra fields, e.g. remat, passed on)."""
        return build(self.config, dtype=self.compute_dtype, quant=self.quant, kernels=self.kernels, **fields)

    def init_cache(self, batch: int, max_len: int) -> dict:
        """An empty KV cache in the compute dtype, laid out on the runtime's mesh."""
        return family_of(self.config).init_cache(self.config, batch, max_len, self.compute_dtype, self.layout)

    def constrain(self, x: jax.Array, axes) -> jax.Array:
        return self.kernels.constrain(x, axes)
