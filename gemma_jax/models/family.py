"""What a model family is: its config, its Flax modules and the schema of every parameter.

A family lives in one folder, `gemma_jax/models/<family>/`, and exports one `Family`. Everything
outside that folder reads the family's knowledge from it: checkpoint readers and writers take
names, layouts and shapes from the schema's `Param` rows, int8 quantization takes which weights
become int8 (and which norm feeds which projection, for SmoothQuant) from them, and sharding
takes logical axes from them. So a new family, or a new parameter, is a change in one folder.

A `Param` row names one parameter (one per layer when its path holds `{i}`): our path and shape,
its logical axes, its Hugging Face name and layout, its GGUF name, and how it quantizes. Shapes
are words of dimension letters (`"N H D"`; a word multiplies its letters: `"NH D"` is
`(N*H, D)`) that the family's `dims(config, layer)` sizes. Our layout keeps Hugging Face's
`[out, in]` order with head dims split out, so converting either way is a reshape, never a
transpose.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import linen as nn

ParamPath = tuple[str, ...]
Config = Any  # a family's frozen config dataclass
LAYERS = "layers"  # a scanned model's stacked layers: their params' key, and the logical name of the leading axis


class ConfigError(ValueError):
    """A config field holding a value no model of the family has; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field!r} {problem}")
        self.field, self.problem = field, problem


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a family (one per layer when `path` holds "{i}"; `layers` may restrict "{i}" to
    other indices). Its GGUF tensor is usually one per our tensor; with `gguf_stacked`, one GGUF tensor
    holds all of the row's "{i}" tensors stacked on axis 0 (GGUF shape `(n,) + hf_shape`)."""

    path: str  # our pytree path, "/"-joined: "layer_{i}/attn/q/w"
    shape: str  # our shape in dimension letters: "N H D"
    axes: tuple[str, ...]  # logical axis names, one per word of `shape` (see gemma_jax/sharding/rules.py)
    hf: str  # Hugging Face safetensors name: "model.layers.{i}.self_attn.q_proj.weight"
    hf_shape: str  # HF's shape in letters: "NH D"
    gguf: str | None = None  # llama.cpp's tensor name ("blk.{i}.attn_q.weight"); None: not in GGUF
    int8_in: int | None = None  # int8: how many trailing (contracted) dims; the f32 scale has the others. None: float
    linear: bool = False  # HF stores it as a torch Linear weight (what compressed-tensors quantizes)
    norm: str | None = None  # "zero_centred" (the model multiplies by 1 + w; llama.cpp stores 1 + w) or "plain"
    smooth_from: str | None = None  # SmoothQuant: the path of the RMSNorm scale that feeds this projection
    when: str | None = None  # a predicate in the family's `when` table: the row exists only where it holds
    layers: str | None = None  # a predicate over (config, layer) in `when`: which layers hold it (None: all)
    # GGUF holds this row's "{i}" tensors as one, stacked on a new first axis in index order (llama.cpp's
    # AltUp projections): `gguf` then names that tensor and has no "{i}".
    gguf_stacked: bool = False
    lookup: bool = False  # a table the model only gathers rows from (never multiplied whole): a decode step reads B rows

    def __post_init__(self) -> None:
        if len(self.axes) != len(self.shape.split()):
            raise ValueError(f"{self.path}: {len(self.axes)} axes for shape {self.shape!r}")
        if self.gguf_stacked and ("{i}" not in self.path or self.gguf is None or "{i}" in self.gguf):
            raise ValueError(f"{self.path}: a stacked GGUF tensor needs an indexed path and one GGUF name without {{i}}")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One `Param` resolved for a config and layer: its names, both shapes and the layout conversion."""

    hf_name: str
    path: ParamPath
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    param: Param
    index: int | None = None  # the row's "{i}" (a layer, or e.g. an AltUp stream)

    @property
    def linear(self) -> bool:
        return self.param.linear

    @property
    def gguf_name(self) -> str | None:
        return None if self.param.gguf is None else self.param.gguf.format(i=self.index)

    @property
    def layer(self) -> int | None:
        return _layer(self.path)

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        """HF layout -> ours, C-contiguous so later device transfers and saves see plain memory."""
        return np.ascontiguousarray(x.reshape(self.shape))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Ours -> HF layout, C-contiguous: safetensors writes raw memory and ignores strides."""
        return np.ascontiguousarray(x.reshape(self.hf_shape))


@dataclasses.dataclass(frozen=True, eq=False)  # one object per family, compared (and hashed) by identity
class Family:
    """A model family: everything the rest of gemma_jax needs to know about it, in one object."""

    name: str  # "gemma"
    config: type  # frozen dataclass with MODEL_TYPES, from_hf(dict), to_hf(), from_preset(name), num_layers
    module: type  # the Flax decoder: module(config, dtype=, param_dtype=, quant=, remat=, kernels=)(tokens, ...)
    init_cache: Callable[..., dict]  # (config, batch, max_len, dtype, layout=None) -> an empty KV cache
    cache_axes: Mapping[str, tuple[str, ...]]  # logical axes of each cache leaf kind ("k", "v", "pos")
    schema: tuple[Param, ...]
    when: Mapping[str, Callable[..., bool]]  # predicates named by Param.when (config) and Param.layers (config, i)
    dims: Callable[[Config, int | None], dict[str, int]]  # dimension letter -> size, for a layer (None: model-wide)
    hf_unused: Callable[[Config, str], bool] | None = None  # HF tensors a checkpoint may hold that the model never reads
    hf_text_prefix: str | None = None  # a multimodal checkpoint's text stack (its config.json has `text_config`)
    gguf: Any = None  # its GGUF module (ARCHS, config_from_metadata, metadata_for, stored), if llama.cpp runs it
    google: Any = None  # its gemma-library checkpoint recipe module, if Google released it that way
    # (periods, first unrolled layer) of a scanned model (module(..., scan=True)); None: the family does not scan
    scanned_layers: Callable[[Config], tuple[int, int]] | None = None

    def tensor_specs(self, config: Config) -> dict[str, TensorSpec]:
        """Every tensor a checkpoint of `config` holds, keyed by HF name, in HF's order (embedding,
        layer by layer, the rest), so that shards hold whole layers."""
        return _tensor_specs(self, config)

    def init_params(self, config: Config, rng: jax.Array, param_dtype: Any = np.float32, quant: str | None = None) -> dict:
        """Random parameters (int8 placeholders with `quant`), as a plain pytree, one entry per layer."""
        return nn.meta.unbox(self._init_boxed(config, rng, param_dtype, quant))

    def param_axes(self, config: Config, quant: str | None = None, scan: bool = False) -> dict:
        """The params pytree with each leaf replaced by its logical axis names (a tuple), from the module itself
        (with `scan`: the scanned model's, whose stacked layers lead with the `LAYERS` axis)."""
        boxed = jax.eval_shape(lambda: self._init_boxed(config, jax.random.PRNGKey(0), np.float32, quant, scan))
        return jax.tree.map(tuple, nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

    def scans(self, config: Config) -> bool:
        """Whether a scanned model of `config` scans any layers (a family may not scan; a model may be shorter than a period)."""
        return self.scanned_layers is not None and self.scanned_layers(config)[0] > 0

    def stacked_at(self, config: Config, path: ParamPath) -> tuple[ParamPath, int] | None:
        """Where the per-layer entry at `path` ("layer_{i}", ...) lives in a scanned model's tree: (its stacked
        path, LAYERS/"block_{j}"/..., and its index on the leading axis); None where it is not stacked."""
        i = _layer(path)
        if i is None or not self.scans(config):
            return None
        periods, first = self.scanned_layers(config)
        period = first // periods
        return ((LAYERS, f"block_{i % period}", *path[1:]), i // period) if i < first else None

    def stack_layers(self, config: Config, tree: dict, stack: Callable[[list], Any] | None = None) -> dict:
        """A per-layer tree ("layer_{i}" entries: params, int8 params, LoRA factors) in a scanned model's
        layout; a tree already stacked, or of a family that does not scan, is returned as it is.

        This and `stacked_at` are the one place that maps between the two layouts: checkpoints stay per layer.
        Each stacked leaf is built and the per-layer leaves it replaces are dropped before the next, so memory
        peaks at the model plus one stacked leaf (`tree` is emptied of the stacked layers' entries on the way).
        `stack` makes a stacked leaf from the layers' leaves in order (default: `jnp.stack`; `stacked_axes` for
        trees of logical axes).
        """
        if LAYERS in tree or not self.scans(config):
            return tree
        flat = {k: v for k, v in flatten_paths(tree)}
        tree.clear()
        groups: dict[ParamPath, list[tuple[int, ParamPath]]] = {}
        for path in flat:
            where = self.stacked_at(config, path)
            if where is not None:
                groups.setdefault(where[0], []).append((where[1], path))
        out = {}
        for stacked, members in groups.items():
            set_path(out, stacked, (stack or jax.numpy.stack)([flat.pop(path) for _, path in sorted(members)]))
        for path, leaf in flat.items():
            set_path(out, path, leaf)
        return out

    def unstack_layers(self, config: Config, tree: dict) -> dict:
        """The per-layer tree of a scanned model's `tree` (the inverse of `stack_layers`; a per-layer tree as it is)."""
        if LAYERS not in tree:
            return tree
        out = {}
        for path, spec in self.layer_leaves(config, tree).items():
            set_path(out, path, spec.get() if isinstance(spec, LayerSlice) else spec)
        return out

    def layer_leaves(self, config: Config, tree: dict) -> dict[ParamPath, Any]:
        """Per-layer path -> leaf of a tree in either layout, stacked layers as `LayerSlice`s (nothing is copied)."""
        periods, first = self.scanned_layers(config) if LAYERS in tree else (0, 0)
        leaves = {}
        for path, leaf in flatten_paths(tree):
            if path[0] != LAYERS:
                leaves[path] = leaf
                continue
            j = int(path[1].removeprefix("block_"))
            for p in range(periods):
                leaves[(f"layer_{p * (first // periods) + j}", *path[2:])] = LayerSlice(leaf, p)
        return leaves

    def logical_axes(self, path: ParamPath) -> tuple[str, ...]:
        """Logical axes of the parameter at `path` for any config, float or int8 (an int8 weight keeps its
        float axes; its `scale` has the weight's output axes). Loaders place each tensor with these as it
        is read, before a model is built."""
        return _axes_by_path(self)(path)

    def _init_boxed(self, config: Config, rng: jax.Array, param_dtype: Any, quant: str | None, scan: bool = False) -> dict:
        tokens = np.zeros((1, 1), np.int32)
        module = self.module(config, param_dtype=param_dtype, quant=quant, **({"scan": True} if scan else {}))
        return module.init(rng, tokens, tokens, tokens + 1)["params"]


def stacked_axes(layers: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The logical axes of a stacked leaf: the `LAYERS` axis, then a layer's (a `stack` for `Family.stack_layers`)."""
    return (LAYERS, *layers[0])


@dataclasses.dataclass(frozen=True)
class LayerSlice:
    """One layer's leaf inside a stacked leaf, not yet sliced out (so that a writer copies one layer at a time)."""

    stacked: Any
    index: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stacked.shape[1:])

    @property
    def dtype(self) -> Any:
        return self.stacked.dtype

    def get(self) -> Any:
        return self.stacked[self.index]


def flatten_paths(tree: Mapping[str, Any], prefix: ParamPath = ()) -> Iterable[tuple[ParamPath, Any]]:
    """(path, leaf) for every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten_paths(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def set_path(tree: dict[str, Any], path: ParamPath, value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating the nested dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _layer(path: ParamPath) -> int | None:
    head = path[0]
    return int(head.removeprefix("layer_")) if head.startswith("layer_") and head[6:].isdigit() else None


def shape_of(letters: str, dims: Mapping[str, int]) -> tuple[int, ...]:
    """"NH D" -> (N*H, D): a word of letters is the product of those dimensions."""
    return tuple(math.prod(dims[c] for c in word) for word in letters.split())


def _tensor_specs(family: Family, config: Config) -> dict[str, TensorSpec]:
    specs = []
    for param in family.schema:
        if param.when is not None and not family.when[param.when](config):
            continue
        per_layer = "{i}" in param.path
        for i in range(config.num_layers) if per_layer else [None]:
            if per_layer and param.layers is not None and not family.when[param.layers](config, i):
                continue
            dims = family.dims(config, i)
            path = tuple(param.path.format(i=i).split("/"))
            specs.append(TensorSpec(param.hf.format(i=i), path, shape_of(param.hf_shape, dims), shape_of(param.shape, dims), param, i))
    # HF's order: model-wide rows listed before the first per-layer row (the embeddings), then layer by
    # layer, then the other model-wide rows; stable, so schema order within a layer.
    first = next(n for n, p in enumerate(family.schema) if "{i}" in p.path)
    before = {p for p in family.schema[:first]}
    order = lambda s: s.layer if s.layer is not None else -1 if s.param in before else config.num_layers
    return {s.hf_name: s for s in sorted(specs, key=order)}


@functools.cache
def _axes_by_path(family: Family) -> Callable[[ParamPath], tuple[str, ...]]:
    """path -> logical axes, from the schema's path templates ("layer_{i}" matches any layer, and any
    other "name_{i}" any index, e.g. Gemma 3n's "altup_proj_{i}")."""
    table: dict[tuple[str, ...], tuple[str, ...]] = {}
    for param in family.schema:
        key = tuple(param.path.replace("{i}", "*").split("/"))
        table[key] = param.axes
        if param.int8_in is not None:  # the int8 weight's scale: its output axes
            table[key[:-1] + ("scale",)] = param.axes[: len(param.axes) - param.int8_in]
    pattern = re.compile(r"(.+_)\d+")

    def axes(path: ParamPath) -> tuple[str, ...]:
        key = tuple(pattern.sub(r"\1*", part) if pattern.fullmatch(part) else part for part in path)
        if key not in table:
            raise KeyError(f"no parameter {'/'.join(path)} in the {family.name} model")
        return table[key]

    return axes


def check_shapes(found: Mapping[Any, tuple[int, ...]], expected: Mapping[Any, tuple[int, ...]], where: str) -> None:
    """Refuse a checkpoint whose tensor names or shapes are not the ones expected (keys print via '/'.join)."""
    name = lambda k: "/".join(k) if isinstance(k, tuple) else str(k)
    unexpected = [name(k) for k in found if k not in expected]
    if unexpected:
        raise ValueError(f"{where}: unexpected tensors {listing(unexpected)}")
    missing = [name(k) for k in expected if k not in found]
    if missing:
        raise ValueError(f"{where}: missing tensors {listing(missing)}")
    for k, shape in expected.items():
        if tuple(found[k]) != tuple(shape):
            raise ValueError(f"{where}: tensor {name(k)} has shape {list(found[k])}, but the config implies {list(shape)}")


def listing(items: Iterable[str], limit: int = 5) -> str:
    """The first `limit` items, comma-separated, and how many more: for error messages."""
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_layer_count(config: Config | int, stored: int, where: object) -> None:
    """Refuse a config with more layers than the checkpoint stores tensors, before anything is built per layer.

    The layer count comes from a header: four edited bytes can make it 10^9, and the tables built
    per layer (ours, gguf's name map) would then fill the memory. Every layer has several tensors,
    so a true config never has more layers than its checkpoint has tensors; smaller mismatches are
    then reported tensor by tensor. `config` may be the layer count itself, to check it before a config is built.
    """
    layers = config if isinstance(config, int) else config.num_layers
    if layers > stored:
        raise ValueError(f"{where}: the config says {layers} layers, "
                         f"but the checkpoint holds only {stored} tensors")  # fmt: skip
