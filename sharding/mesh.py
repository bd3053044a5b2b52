"""Device meshes with the axes (data, fsdp, tensor), from specs such as "data=2,fsdp=2,tensor=2".

`jax.make_mesh` orders devices for the physical topology (TPU ICI rings); with a DCN spec the
mesh spans several slices through `create_hybrid_device_mesh`, keeping the fast axes inside a slice.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


def parse_mesh_spec(spec: str | Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """"fsdp=4,tensor=2" -> {"data": 1, "fsdp": 4, "tensor": 2}. One axis may be -1 (the rest);
    an empty spec puts every device on "data"."""
    if spec is None or spec == "":
        sizes = {"data": -1}
    elif isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            name, eq, value = part.partition("=")
            if not eq or name.strip() not in AXES:
                raise ValueError(f"bad mesh spec {spec!r}: expected comma-separated AXIS=N with AXIS in {AXES}")
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise ValueError(f"bad mesh spec {spec!r}: {value!r} is not an integer") from None
    else:
        sizes = dict(spec)
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ValueError(f"bad mesh spec {spec!r}: unknown axes {sorted(unknown)}; use {AXES}")
    sizes = {axis: sizes.get(axis, 1) for axis in AXES}
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
        raise ValueError(f"bad mesh spec {spec!r}: sizes must be positive, with at most one -1")
    known = math.prod(n for n in sizes.values() if n != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh spec {spec!r} does not divide {num_devices} devices")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh spec {spec!r} needs {math.prod(sizes.values())} devices, but there are {num_devices}")
    return sizes


def make_mesh(
    spec: str | Mapping[str, int] | None = None,
    *,
    dcn: str | Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over all (or the given) devices. `spec` sizes each axis within a slice; `dcn`
    (multi-slice only) sizes each axis across slices, e.g. spec "fsdp=-1", dcn "data=2"."""
    devices = list(devices or jax.devices())
    types = (AxisType.Auto,) * len(AXES)  # linen-style logical constraints need Auto axes
    if dcn is None:
        shape = parse_mesh_spec(spec, len(devices))
        return jax.make_mesh(tuple(shape.values()), AXES, types, devices=devices)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    across = parse_mesh_spec(dcn, slices)
    within = parse_mesh_spec(spec, len(devices) // slices)
    grid = mesh_utils.create_hybrid_device_mesh(tuple(within.values()), tuple(across.values()), devices)
    return Mesh(np.asarray(grid), AXES, axis_types=types)
