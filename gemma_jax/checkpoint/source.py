"""The shared core of every checkpoint format: a checkpoint opened as a stream of tensors in our layout.

Every reader opens its format as a `TensorSource` (config + tensors read one at a time, validated
from headers first) and every writer pulls one tensor at a time from one, which is how the
converter joins any reader to any writer with memory near the largest tensor. Which tensors a
config implies, with their names and layouts, comes from the model family's schema
(`gemma_jax.models`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from gemma_jax.models import Config, ParamPath, TensorSpec, family_of, tensor_specs
from gemma_jax.models.family import LayerSlice, listing, set_path

Put = Callable[[ParamPath, np.ndarray], Any]
Array = Any  # np.ndarray, or a jax.Array (possibly sharded) for params already in memory
Shape = tuple[int, ...]
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))
_CHUNK = 1 << 20  # elements per step of the finiteness check


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """A checkpoint opened for streaming: its config, and its tensors read one at a time in our layout.

    Openers validate names, shapes and dtypes from headers or metadata before returning a source,
    so a bad checkpoint fails before anything is written. Iterating yields `(spec, array)` in HF
    order (embedding, layer by layer, final norm) and checks each array against the config as it
    is read, so not even a lying header or a reader bug can put a wrong tensor into an output.
    """

    config: Config
    dtypes: Mapping[ParamPath, np.dtype]  # the dtype `read` returns for each tensor
    read: Callable[[TensorSpec], Array]  # one tensor, in our layout
    tokenizer: bytes | None = None  # the sentencepiece model (tokenizer.model), if the checkpoint has one
    origin: str | None = None  # the checkpoint's path, which errors on reading name

    def __post_init__(self) -> None:
        wanted = {s.path for s in self.specs.values()}
        if set(self.dtypes) != wanted:
            raise ValueError(f"tensor dtypes given for {listing('/'.join(p) for p in set(self.dtypes) ^ wanted)}, "
                             "which is not the set of tensors the config implies")  # fmt: skip
        bad = sorted({np.dtype(d).name for d in self.dtypes.values()} - {d.name for d in FLOAT_DTYPES})
        if bad:
            raise ValueError(f"Gemma weights must be float32, bfloat16 or float16, not {', '.join(bad)}")

    @functools.cached_property
    def specs(self) -> dict[str, TensorSpec]:
        return tensor_specs(self.config)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s.shape) * np.dtype(self.dtypes[s.path]).itemsize for s in self.specs.values())

    def __iter__(self) -> Iterator[tuple[TensorSpec, Array]]:
        for spec in self.specs.values():
            x = self.read(spec)
            want = np.dtype(self.dtypes[spec.path])
            where = f"{self.origin}: " if self.origin else ""
            if tuple(x.shape) != spec.shape or np.dtype(x.dtype) != want:
                raise ValueError(
                    f"{where}tensor {'/'.join(spec.path)} (HF {spec.hf_name}) was read as {np.dtype(x.dtype).name} "
                    f"{list(x.shape)}, but the config implies {want.name} {list(spec.shape)}"
                )
            if not _finite(x):
                raise ValueError(f"{where}tensor {'/'.join(spec.path)} (HF {spec.hf_name}) holds NaN or infinite "
                                 "values (corrupt, or overflowed in a cast); they would make the outputs NaN")  # fmt: skip
            yield spec, x


def _finite(x: Array) -> bool:
    """Whether every value is finite, at memory speed and without a tensor-sized temporary.

    On the host, a float is NaN or infinite exactly when its bits without the sign are at least
    those of +inf; the maximum of that is taken a chunk at a time (numpy's own max on bfloat16
    runs 40x slower). A device array is reduced on its device (max and min propagate NaN).
    """
    if not isinstance(x, np.ndarray):
        return math.isfinite(float(x.max())) and math.isfinite(float(x.min()))
    bits = np.dtype(f"u{x.dtype.itemsize}")
    inf, magnitude = np.array(np.inf, x.dtype).view(bits), bits.type(np.iinfo(bits).max >> 1)
    flat = x.reshape(-1).view(bits)
    return all((flat[i : i + _CHUNK] & magnitude).max() < inf for i in range(0, flat.size, _CHUNK))


def params_source(config: Config, params: Mapping[str, Any], tokenizer: bytes | None = None) -> TensorSource:
    """A source over a param tree in memory (numpy or jax arrays), per layer or a scanned model's stacked
    tree (read one layer at a time: checkpoints stay per layer); refuses missing, extra or mis-shaped params."""
    leaves = checked_leaves(family_of(config).layer_leaves(config, params), tensor_specs(config))
    read = lambda s: leaves[s.path].get() if isinstance(leaves[s.path], LayerSlice) else leaves[s.path]
    return TensorSource(config, {p: np.dtype(x.dtype) for p, x in leaves.items()}, read, tokenizer)


def collect(source: TensorSource, put: Put | None = None) -> dict[str, Any]:
    """Read a whole source into a param tree; `put(path, array)` may place each tensor (e.g. on devices) as it is read."""
    params: dict[str, Any] = {}
    for spec, x in source:
        set_path(params, spec.path, x if put is None else put(spec.path, x))
    return params


def checked_leaves(leaves: Mapping[ParamPath, Any], specs: Mapping[str, TensorSpec]) -> dict[ParamPath, Any]:
    """Our path -> array (`leaves`, per layer) for every spec, refusing missing, extra or mis-shaped params."""
    leaves = dict(leaves)
    wanted = {s.path: s for s in specs.values()}
    extra = ["/".join(p) for p in leaves if p not in wanted]
    if extra:
        raise ValueError(f"params have entries with no Hugging Face name: {listing(extra)}")
    for p, spec in wanted.items():
        if p not in leaves:
            raise ValueError(f"params lack {'/'.join(p)} (HF {spec.hf_name})")
        if tuple(leaves[p].shape) != spec.shape:
            raise ValueError(f"params {'/'.join(p)} has shape {list(leaves[p].shape)}, config implies {list(spec.shape)}")
    return leaves
