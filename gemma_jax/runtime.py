"""The one static key of every compiled program: model config, compute dtype, quantization scheme,
the `Kernels` value (int8 and attention backends, interpret mode, mesh layout), the KV cache's dtype and
whether the layers run as a scan (then params and cache are in the scanned layout: `Family.stack_layers`).

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
from gemma_jax.models.family import LAYERS
from gemma_jax.sharding import Layout, tree_shardings

KV_CACHES = ("float", "int8")


@dataclasses.dataclass(frozen=True)
class Runtime:
    config: Config
    dtype: str  # compute (activation and cache) dtype name
    quant: str | None = None  # "w8a8" / "w8a16" for int8 params (see gemma_jax.quant)
    kernels: Kernels = Kernels()
    kv_cache: str = "float"  # "float" (the compute dtype) or "int8" (per token and head scales; models/kv_cache.py)
    scan: bool = False  # layers as one lax.scan over whole periods of the layer pattern (only where the family scans)

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"unknown KV cache {self.kv_cache!r}; choose one of {', '.join(KV_CACHES)}")

    @classmethod
    def create(
        cls, config: Config, dtype: Any = jnp.float32, *, layout: Layout | None = None, quant: str | None = None,
        kv_cache: str = "float", int8: str | None = None, attention: str | None = None, interpret: bool | None = None,
        scan: bool = False,
    ) -> Runtime:  # fmt: skip
        """A runtime with the platform's kernel defaults (see `Kernels.for_platform`), overridable here.
        `scan` holds only where the family scans this config (`Family.scans`): elsewhere layers run unrolled."""
        kernels = Kernels.for_platform(layout, int8=int8, attention=attention, interpret=interpret)
        return cls(config, jnp.dtype(dtype).name, quant, kernels, kv_cache, scan and family_of(config).scans(config))

    @property
    def layout(self) -> Layout | None:
        return self.kernels.layout

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def model(self, **fields: Any) -> Any:
        """The family's Flax decoder for this runtime (extra fields, e.g. remat, passed on)."""
        scan = {"scan": True} if self.scan else {}  # families that do not scan have no such field
        return build(self.config, dtype=self.compute_dtype, quant=self.quant, kernels=self.kernels, **scan, **fields)

    def init_cache(self, batch: int, max_len: int) -> dict:
        """An empty KV cache (compute dtype, or int8), laid out on the runtime's mesh."""
        dtype = jnp.int8 if self.kv_cache == "int8" else self.compute_dtype
        scan = {"scan": True} if self.scan else {}
        return family_of(self.config).init_cache(self.config, batch, max_len, dtype, self.layout, **scan)

    def layered(self, params: dict) -> dict:
        """`params` (per layer, as loaded; consumed) in this runtime's layout: stacked when it scans (see
        `Family.stack_layers`), each stacked weight split over the runtime's mesh like its layers."""
        family = family_of(self.config)
        if not self.scan or LAYERS in params:
            return params
        params = family.stack_layers(self.config, params)
        if self.layout is None:
            return params
        return jax.device_put(params, tree_shardings(self.layout, family.param_axes(self.config, self.quant, scan=True), params))

    def constrain(self, x: jax.Array, axes) -> jax.Array:
        return self.kernels.constrain(x, axes)
