"""Capacity planning: does a model fit on a slice, and how fast can it go, before a pod is booked?

Per-device bytes come from the same sources the runtime uses: `param_axes` and `init_cache`
shapes, placed by `sharding.Layout.spec` (its divisibility fallback included) on an
`AbstractMesh`, so no devices are needed. Speeds are rooflines from published chip peaks:
each step takes max(bytes / HBM bandwidth, FLOPs / peak). Collectives, kernel efficiency and
XLA's own reserved HBM are ignored, so real numbers are lower; use this to rule slices out.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict
from jax.sharding import AbstractMesh

from gemma_jax.models import Config, family_of, init_params, param_axes
from gemma_jax.models.kv_cache import paged_cache, pool_pages, table_width
from gemma_jax.runtime import KV_CACHES
from gemma_jax.sharding import AXES, RULE_SETS, Layout

GiB = 2**30
GATHERED_AXES = ("data", "fsdp")  # weights split over these are gathered before use


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm: int  # bytes
    bandwidth: float  # HBM bytes/s
    bf16: float  # dense bf16 FLOP/s
    int8: float  # dense int8 OP/s


# Published per-chip peaks (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}; NVIDIA H100 SXM
# datasheet, dense i.e. without 2:4 sparsity). v4 has no faster int8 path.
CHIPS: dict[str, Chip] = {
    "v4": Chip(32 * GiB, 1228e9, 275e12, 275e12),
    "v5e": Chip(16 * GiB, 819e9, 197e12, 394e12),
    "v5p": Chip(95 * GiB, 2765e9, 459e12, 918e12),
    "v6e": Chip(32 * GiB, 1640e9, 918e12, 1836e12),
    "h100": Chip(80 * GiB, 3350e9, 989e12, 1979e12),
}
# "w8a16": weight-only (int8 weights dequantised into bf16 matmuls: bf16 peak);
# "w8a8": int8 weights and activations (int8 peak). Both store per-output-channel f32 scales.
QUANT = (None, "w8a16", "w8a8")


@dataclasses.dataclass(frozen=True)
class Plan:
    chip: str
    mesh: dict[str, int]
    batch: int
    seq: int
    param_dtype: str
    quant: str | None
    param_bytes: int  # per device, as stored
    cache_bytes: int  # per device, KV cache of batch x seq
    activation_bytes: int  # per device, prefill peak of one layer (see prefill_peak)
    hbm_bytes: int
    prefill_rows_fit: int  # largest batch whose one-shot prefill fits next to params and cache
    decode_tokens_per_s: float  # whole slice
    decode_bound: str  # "memory" or "compute"
    prefill_tokens_per_s: float  # whole slice
    prefill_bound: str
    assumptions: tuple[str, ...]

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.cache_bytes + self.activation_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.hbm_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0


def local_shape(layout: Layout, axes: Sequence[str | None], shape: Sequence[int], skip: tuple[str, ...] = ()) -> list[int]:
    """Per-device shard shape under `layout`; mesh axes in `skip` count as gathered (not split)."""
    out = []
    for size, part in zip(shape, layout.spec(tuple(axes), tuple(shape))):
        parts = () if part is None else (part,) if isinstance(part, str) else part
        out.append(size // math.prod(layout.mesh.shape[a] for a in parts if a not in skip))
    return out


@functools.lru_cache(maxsize=8)
def _params(config: Config, quant: str | None) -> tuple[tuple[tuple[str, ...], tuple, tuple[int, ...], np.dtype], ...]:
    """(path, logical axes, shape, stored dtype or None for float) of every parameter, traced abstractly."""
    axes = flatten_dict(param_axes(config, quant))
    shapes = flatten_dict(jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), quant=quant)))
    int8 = {path[:-1] for path, leaf in shapes.items() if leaf.dtype == jnp.int8}
    stored = lambda path, leaf: leaf.dtype if path[:-1] in int8 else None  # int8 weights and their f32 scales
    return tuple((path, axes[path], tuple(shapes[path].shape), stored(path, shapes[path])) for path in sorted(axes))


def device_param_bytes(
    config: Config, layout: Layout, dtype: np.dtype, quant: str | None, skip=(), multiplied: bool = False
) -> tuple[int, int]:  # fmt: skip
    """(bytes, weight elements) per device, for the tree `gemma_jax.quant` makes: with `quant`, every projection
    and the tied embedding is int8 with f32 scales per output channel (per row for the embedding). `multiplied`:
    only the weights a forward step multiplies, without the tables it only gathers rows from (`Param.lookup`:
    Gemma 3n's per-layer embedding, whose B rows a decode step reads are left out)."""
    lookups = _lookup_paths(config) if multiplied else ()
    total = elements = 0
    for path, axes, shape, stored in _params(config, quant):
        if any(path[: len(table)] == table for table in lookups):
            continue
        n = math.prod(local_shape(layout, axes, shape, skip))
        total += n * np.dtype(stored or dtype).itemsize
        elements += 0 if stored == np.float32 else n  # scales are not multiplied
    return total, elements


def _lookup_paths(config: Config) -> tuple[tuple[str, ...], ...]:
    return tuple(spec.path for spec in family_of(config).tensor_specs(config).values() if spec.param.lookup)


def _slots(config: Config, kind: str, n: int) -> int:
    """Cache slots (or keys within reach) of a layer at length n: sliding-window layers keep at most a window."""
    return min(config.sliding_window, n) if kind == "local" else n


def _cache_bytes(
    config: Config, layout: Layout, batch: int, seq: int, dtype: np.dtype, context: int | None = None,
    pages: tuple[int, int] | None = None,
) -> int:  # fmt: skip
    """Per-device bytes of `init_cache(config, batch, seq, dtype)` (int8: with its scales), from the family's
    own cache traced abstractly; with `context`, only the min(context, slots) slots per layer that a decode
    step there must read; with `pages` (page size, KV budget in tokens), the engine's paged cache for
    `batch` rows of up to `seq` tokens instead (its pools are split by heads only)."""
    family = family_of(config)
    cache = jax.eval_shape(lambda: family.init_cache(config, batch, seq if context is None else min(context, seq), dtype))
    if pages is not None and context is None:
        page, kv_tokens = pages
        counts = {(w := table_width(layer["k"].shape[-2], seq, page)): pool_pages(w, seq, page, kv_tokens, batch) for layer in cache.values()}
        cache = jax.eval_shape(lambda: paged_cache(cache, seq, page, counts, batch, None))
    return sum(
        math.prod(local_shape(layout, family.cache_axes[kind], leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for layer in cache.values()
        for kind, leaf in layer.items()
    )


def prefill_peak(config: Config, layout: Layout, batch: int, T: int, c: int, splash: bool) -> tuple[int, float]:
    """(peak activation bytes, attention FLOPs) per device for a one-shot prefill of T tokens.

    `generate` prefills an empty cache by attending within the prompt. Dense (XLA) attention
    materialises f32 logits and c-byte probs [B N T T] and computes every key (windows masked,
    not skipped); splash attention (TPU, T a multiple of 128) holds no logits and skips blocks
    the mask rules out: about T/2 keys per query on global layers, a window on local ones.
    Peak = the residual streams (one, or Gemma 3n's AltUp streams) + normed input [B T D] plus the
    larger of attention (q, k, v, out, + logits and probs when dense) and MLP (gate, up, gelu*up
    [B T F], F of the widest layer). B, N, K, F are per-device shards under the act_* rules; c =
    compute dtype bytes.
    """
    widest = max(config.mlp_dim) if isinstance(config.mlp_dim, tuple) else config.mlp_dim  # Gemma 3n: per layer
    streams = getattr(config, "altup_num_inputs", 1)  # Gemma 3n carries several residual streams
    # One name at a time: heads and mlp all map to `tensor`, which one array could use only once.
    dims = {"act_batch": batch, "act_heads": config.num_heads, "act_kv_heads": config.num_kv_heads, "act_mlp": widest}
    B, N, K, F = (local_shape(layout, (name,), (n,))[0] for name, n in dims.items())
    D, H = config.embed_dim, config.head_dim
    attention = B * T * (2 * N + 2 * K) * H * c + (0 if splash else B * N * T * T * (4 + c))
    keys = [(T / 2 if kind == "global" else _slots(config, kind, T)) if splash else T for kind in config.layer_kinds]
    peak = (streams + 1) * B * T * D * c + max(attention, 3 * B * T * F * c)
    return peak, 4.0 * B * N * H * T * sum(keys)  # QK^T and PV: 2 matmuls x 2 FLOPs per MAC


def plan(
    config: Config,
    mesh_sizes: Mapping[str, int],
    *,
    chip: str,
    batch: int,
    seq: int,
    param_dtype: str = "bfloat16",
    quant: str | None = None,
    rules: str = "inference",
    decode_context: int | None = None,
    kv_cache: str = "float",
    page_size: int = 32,
    kv_tokens: int | None = None,
) -> Plan:
    """Per-device memory and whole-slice roofline speeds for `batch` sequences of `seq` tokens.

    `mesh_sizes` sizes the (data, fsdp, tensor) axes; missing ones are 1. Activations and cache
    are in `param_dtype` (bf16 when quantised). A decode step reads every weight a device
    multiplies once, plus the KV cache at `decode_context` (default seq // 2: sequences spread
    evenly over their lifetime), as it reads only filled blocks; prefill runs batch x seq tokens in one
    pass. `kv_cache="int8"` sizes an int8 cache with its per-token-and-head scales. `kv_tokens` sizes the
    engine's paged cache instead of a dense one: global layers hold pages for `kv_tokens` tokens shared by
    `batch` rows (each up to `seq` tokens), sliding-window layers a ring per row.
    """
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be at least 1, got batch={batch}, seq={seq}")
    name = chip.lower().removeprefix("tpu").strip("-_ ")
    if name not in CHIPS or quant not in QUANT or set(mesh_sizes) - set(AXES) or kv_cache not in KV_CACHES:
        raise ValueError(f"need chip in {list(CHIPS)}, quant in {QUANT}, mesh axes in {AXES}, kv_cache in {KV_CACHES}; "
                         f"got {chip!r}, {quant!r}, {dict(mesh_sizes)}, {kv_cache!r}")
    hw, sizes = CHIPS[name], {a: int(mesh_sizes.get(a, 1)) for a in AXES}
    layout = Layout(AbstractMesh(tuple(sizes.values()), AXES), RULE_SETS[rules])
    pdtype = np.dtype(jnp.dtype(param_dtype))
    c = np.dtype(jnp.bfloat16) if quant else pdtype  # compute (activation and cache) dtype
    context = min(seq, seq // 2 if decode_context is None else decode_context)
    peak = hw.int8 if quant == "w8a8" else hw.bf16

    params, _ = device_param_bytes(config, layout, pdtype, quant)
    read, elements = device_param_bytes(config, layout, pdtype, quant, skip=GATHERED_AXES, multiplied=True)  # weights as multiplied
    kv = np.dtype(np.int8) if kv_cache == "int8" else c  # the KV cache's dtype
    paging = None if kv_tokens is None else (page_size, kv_tokens)
    cache = _cache_bytes(config, layout, batch, seq, kv, pages=paging)
    splash = name != "h100" and seq % 128 == 0  # kernels/attention.py: the TPU default
    acts, prefill_attn = prefill_peak(config, layout, batch, seq, c.itemsize, splash)
    B, N = local_shape(layout, ("act_batch", "act_heads"), (batch, config.num_heads))

    decode_attn = sum(4.0 * B * N * config.head_dim * _slots(config, k, context) for k in config.layer_kinds)
    t_mem = (read + _cache_bytes(config, layout, batch, seq, kv, context)) / hw.bandwidth
    t_flop = (2.0 * elements * B + decode_attn) / peak
    p_mem, p_flop = (read + cache) / hw.bandwidth, (2.0 * elements * B * seq + prefill_attn) / peak
    rows_fit = max(0, (hw.hbm - params - cache) * B // acts) * (batch // B)  # activations are linear in B
    largest = max(_params(config, quant), key=lambda p: math.prod(p[2]))
    largest_bytes = math.prod(local_shape(layout, largest[1], largest[2])) * np.dtype(largest[3] or pdtype).itemsize
    notes = (
        "collective (ICI/NVLink) costs, kernel efficiency and XLA's reserved HBM are ignored",
        f"largest parameter {'/'.join(largest[0])} {list(largest[2])}: {largest_bytes / GiB:.2f} GiB per device "
        f"(axes {', '.join(map(str, largest[1]))}, placed by the {rules} rules)",
        f"decode reads the KV of filled blocks only, at avg context {context} (decode_context)"
        + "".join(f"; of {'/'.join(t)} only the rows of the step's tokens" for t in _lookup_paths(config)),
        f"KV cache: {'dense, ' + str(seq) + ' slots per row' if kv_tokens is None else f'paged ({page_size}-token pages): {kv_tokens} tokens per global layer, pools split by heads only, {kv_tokens // max(context, 1)} rows of avg context'}",
        "prefill attention: splash kernel (no [T T] logits; masked blocks skipped)" if splash else
        "prefill attention: dense f32 logits over the prompt (S = T), windows masked not skipped",
        f"compute in {c.name} at the {'int8' if quant == 'w8a8' else 'bf16'} peak, {peak / 1e12:.0f} TFLOP/s"
        + (" (f32 matmuls run slower)" if c.itemsize == 4 else ""),
    )
    return Plan(
        chip=name, mesh=sizes, batch=batch, seq=seq, param_dtype=pdtype.name, quant=quant,
        param_bytes=params, cache_bytes=cache, activation_bytes=acts, hbm_bytes=hw.hbm, prefill_rows_fit=rows_fit,
        decode_tokens_per_s=batch / max(t_mem, t_flop), decode_bound="memory" if t_mem >= t_flop else "compute",
        prefill_tokens_per_s=batch * seq / max(p_mem, p_flop), prefill_bound="memory" if p_mem >= p_flop else "compute",
        assumptions=notes,
    )  # fmt: skip


def format_plan(p: Plan) -> str:
    """A readable per-device table: memory in GiB against HBM, fit, roofline speeds, assumptions."""
    mesh = ",".join(f"{a}={n}" for a, n in p.mesh.items())
    g = lambda b: f"{b / GiB:9.2f} GiB"
    lines = [
        f"chip {p.chip} x{math.prod(p.mesh.values())} ({mesh}), batch {p.batch}, seq {p.seq}, "
        f"params {p.param_dtype}{' + ' + p.quant if p.quant else ''}",
        f"  params       {g(p.param_bytes)}  per device",
        f"  KV cache     {g(p.cache_bytes)}",
        f"  activations  {g(p.activation_bytes)}  (prefill peak, one layer)",
        f"  total        {g(p.total_bytes)}  of {p.hbm_bytes / GiB:.0f} GiB HBM",
        f"  fits         {'yes' if p.fits else 'NO'}: headroom {p.headroom_bytes / GiB:.2f} GiB "
        f"({p.headroom_bytes / p.hbm_bytes:+.0%}); rows a one-shot prefill fits: {p.prefill_rows_fit}",
        f"  decode       {p.decode_tokens_per_s:12,.0f} tok/s (slice, {p.decode_bound}-bound roofline)",
        f"  prefill      {p.prefill_tokens_per_s:12,.0f} tok/s (slice, {p.prefill_bound}-bound roofline)",
        "assumptions:",
        *(f"  - {a}" for a in p.assumptions),
    ]
    return "\n".join(lines)
