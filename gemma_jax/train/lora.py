"""LoRA: low-rank updates to chosen projections, trained while the base model stays frozen.

A target projection y = x·W (any `Einsum` of the model: q, k, v, o, gate, up, down) becomes
y = x·W + (x·A)·B · alpha/rank, with A over W's contracted (input) axes plus a rank axis and B
over the rank axis plus W's output axes. B starts at zero, so training starts at the base model.

The branch is added by a Flax method interceptor around `Einsum.__call__` rather than inside
the layer: the model code stays as it is, the LoRA params are a separate pytree (their own
variable collection, `COLLECTION`, which a scanned model slices per layer as it does params; so only they
are differentiated and optimised, and the base params are passed through untouched, which
keeps them bit-identical), and an int8 base works unchanged because the interceptor adds to
whatever the base projection returns. Which projections exist, and their equations, shapes
and logical axes, are recorded from one abstract forward pass, so nothing here restates the
model's layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

from gemma_jax.models import Config, build
from gemma_jax.layers import Einsum
from gemma_jax.train.config import TrainConfig

Path = tuple[str, ...]
COLLECTION = "lora"  # the adapters' variable collection, passed to the model's apply beside "params"
_RANK = "r"  # einsum letter of the rank axis (the model's equations use upper case)


@dataclasses.dataclass(frozen=True)
class Projection:
    """One Einsum call of the model: its equation and its weight's shape and logical axes."""

    eqn: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]

    @property
    def parts(self) -> tuple[str, str, str, str, str]:
        """(x dims, w dims, out dims, contracted w dims, output w dims) of the equation."""
        (x, w), out = self.eqn.split("->")[0].split(","), self.eqn.split("->")[1]
        return x, w, out, "".join(d for d in w if d in x), "".join(d for d in w if d not in x)

    def factors(self, rank: int) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
        """{"lora_a": (shape, logical axes), "lora_b": ...}: A spans W's contracted axes and the rank,
        B the rank and W's output axes, so each shards like the side of W it replaces."""
        _, w, _, fan_in, fan_out = self.parts
        in_shape, in_axes = (tuple(seq[w.index(d)] for d in fan_in) for seq in (self.shape, self.axes))
        out_shape, out_axes = (tuple(seq[w.index(d)] for d in fan_out) for seq in (self.shape, self.axes))
        return {"lora_a": (in_shape + (rank,), in_axes + (None,)), "lora_b": ((rank,) + out_shape, (None,) + out_axes)}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Rank, alpha and target projection names (the last element of a projection's path, e.g. "q")."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @classmethod
    def create(cls, cfg: TrainConfig) -> LoraSpec | None:
        """The LoRA of run settings `cfg`, or None for full fine-tuning (rank 0)."""
        return cls(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) if cfg.lora_rank else None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@functools.cache
def projections(config: Config) -> dict[Path, Projection]:
    """Every Einsum call of the model, by module path (e.g. ("layer_0", "attn", "q")), from one abstract pass."""
    found: dict[Path, Projection] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Einsum) and context.method_name == "__call__":
            found[context.module.path] = Projection(args[0], tuple(context.module.shape), tuple(context.module.axes))
        return next_fun(*args, **kwargs)

    tokens = jnp.zeros((1, 1), jnp.int32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: build(config).init(jax.random.PRNGKey(0), tokens, tokens, tokens + 1))
    return found


def _targets(config: Config, spec: LoraSpec) -> Iterator[tuple[Path, Projection]]:
    every = projections(config)
    unknown = set(spec.targets) - {path[-1] for path in every}
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; the model's projections are {sorted({p[-1] for p in every})}")
    return ((path, p) for path, p in every.items() if path[-1] in spec.targets)


def lora_axes(config: Config, spec: LoraSpec) -> dict:
    """The LoRA params tree ({path: {"lora_a", "lora_b"}}) with logical axes for leaves."""
    flat = {path + (name,): axes for path, p in _targets(config, spec) for name, (_, axes) in p.factors(spec.rank).items()}
    return unflatten_dict(flat)


def init_lora(config: Config, spec: LoraSpec, rng: jax.Array, dtype: Any = jnp.float32) -> dict:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (as peft's Kaiming-uniform init), B = 0."""
    flat = {}
    for k, (path, p) in enumerate(_targets(config, spec)):
        (a_shape, _), (b_shape, _) = p.factors(spec.rank).values()
        bound = 1 / math.sqrt(math.prod(a_shape[:-1]))
        flat[path + ("lora_a",)] = jax.random.uniform(jax.random.fold_in(rng, k), a_shape, dtype, -bound, bound)
        flat[path + ("lora_b",)] = jnp.zeros(b_shape, dtype)
    return unflatten_dict(flat)


def lora_delta(projection: Projection, x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """(x·A)·B·scale in x's dtype, shaped like the projection's output."""
    x_dims, _, out, fan_in, fan_out = projection.parts
    batch = "".join(d for d in x_dims if d not in fan_in)
    h = jnp.einsum(f"{x_dims},{fan_in}{_RANK}->{batch}{_RANK}", x, a.astype(x.dtype))
    return jnp.einsum(f"{batch}{_RANK},{_RANK}{fan_out}->{out}", h, (b * scale).astype(x.dtype))


def interceptor(spec: LoraSpec) -> contextlib.AbstractContextManager:
    """A Flax method interceptor that adds the LoRA branch to every projection that has adapters in the apply's
    `COLLECTION` variables (a tree shaped like the params: `init_lora`'s). The model hands each projection
    its own adapters as it does its params, so a scanned model's layers each see their slice of the stacked
    factors. The same holds for an int8 base, whose projections return float outputs.
    """

    def add_branch(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if isinstance(module, Einsum) and context.method_name == "__call__" and module.has_variable(COLLECTION, "lora_a"):
            projection = Projection(args[0], tuple(module.shape), tuple(module.axes))
            a, b = module.get_variable(COLLECTION, "lora_a"), module.get_variable(COLLECTION, "lora_b")
            out = out + lora_delta(projection, args[1], a, b, spec.scale)
        return out

    return nn.intercept_methods(add_branch)


def merge(config: Config, spec: LoraSpec, params: dict, lora: dict) -> dict:
    """Float base params with every LoRA update folded in: W + A·B·scale, in W's layout and dtype.

    (An int8-base run merges into the float checkpoint it was quantized from: see `run._merged`.)
    """
    found = projections(config)
    flat, updates = flatten_dict(params), flatten_dict(lora)
    for path in {key[:-1] for key in updates}:
        _, w_dims, _, fan_in, fan_out = found[path].parts
        a, b = updates[path + ("lora_a",)], updates[path + ("lora_b",)]
        delta = jnp.einsum(f"{fan_in}{_RANK},{_RANK}{fan_out}->{w_dims}", a, b, precision="highest") * spec.scale
        w = flat[path + ("w",)]
        flat[path + ("w",)] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return unflatten_dict(flat)
