"""Logical axis names -> `NamedSharding`s on a mesh, and activation constraints.

Divisibility fallback: a dimension is split over the longest prefix of its rule's mesh axes
whose total size divides it (and that no earlier dimension of the same array uses); if none
does, it is replicated. E.g. 4 KV heads on tensor=8 are replicated over `tensor`, while 8
query heads are split. Results are always valid layouts, never errors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemma_jax.sharding.rules import Rules

LogicalAxes = Sequence[str | None]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the rules to place logical axes on it (hashable: usable as a jit static arg)."""

    mesh: Mesh
    rules: Rules

    def spec(self, axes: LogicalAxes, shape: Sequence[int]) -> PartitionSpec:
        """The partition spec for an array of `shape` whose dims are named `axes`."""
        if len(axes) != len(shape):
            raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
        table, used, out = dict(self.rules), set(), []
        for name, size in zip(axes, shape):
            chosen: tuple[str, ...] = ()
            for mesh_axis in table.get(name, ()) if name else ():
                candidate = chosen + (mesh_axis,)
                if mesh_axis in used or size % math.prod(self.mesh.shape[a] for a in candidate):
                    break
                chosen = candidate
            chosen = tuple(a for a in chosen if self.mesh.shape[a] > 1)
            used.update(chosen)
            out.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
        return PartitionSpec(*out)

    def divisor(self, name: str) -> int:
        """How many ways logical axis `name` can split: pad that dimension to a multiple of it."""
        return math.prod(self.mesh.shape[a] for a in dict(self.rules).get(name, ()))

    def sharding(self, axes: LogicalAxes, shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def constrain(x: jax.Array, axes: LogicalAxes, layout: Layout | None) -> jax.Array:
    """Pin an activation's layout (by logical axis names) on `layout`; identity without one."""
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(axes, x.shape))


def to_host(x: jax.Array):
    """A numpy copy of a replicated (or single-process) array, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if not x.sharding.is_fully_replicated:
        raise ValueError("to_host needs a replicated array on multi-process meshes; constrain it first")
    return np.asarray(x.addressable_data(0))


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """Put a host array onto its shards: each process copies only the slices its devices hold."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def tree_shardings(layout: Layout, axes_tree: Any, shapes_tree: Any) -> Any:
    """NamedShardings for a pytree, given matching pytrees of logical axes (tuples) and shaped leaves."""
    is_axes = lambda t: isinstance(t, (tuple, PartitionSpec))
    return jax.tree.map(lambda axes, leaf: layout.sharding(tuple(axes), leaf.shape), axes_tree, shapes_tree, is_leaf=is_axes)
