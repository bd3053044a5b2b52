"""The Gemma decoder (Gemma 1, 2 and 3 text through config flags), as functional Flax modules.

Shapes use named dims: B batch, T query length, S key length, D embed, N query heads,
K kv heads, G = N / K query heads per kv head, H head dim, F mlp dim, V vocab. Weights are
stored [out..., in...] as in Hugging Face checkpoints: q is [N H D], o is [D N H].

Every sequence position carries an explicit position and segment id, so left- or
right-padded batches and packed documents are all the same code: a key is visible to a
query when it is valid (position >= 0), not in the future, in the same segment, and — on
sliding-window layers — fewer than `sliding_window` positions back.

The KV cache (layout, ring buffers for sliding-window layers, pages, the int8 option) is
`models/kv_cache.py` and the softmax over it `models/attention.py` (splash attention for whole
sequences on TPU, decode steps reading only filled blocks), both shared with the other families.
Every module takes the `Kernels` value of the program being traced (backends and mesh layout), so
nothing here reads global state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_jax.kernels import Kernels
from gemma_jax.layers import Einsum, Embedder, RMSNorm, rematerialized, rope, soft_cap
from gemma_jax.models.attention import attend
from gemma_jax.models.family import LAYERS
from gemma_jax.models.gemma.config import GemmaConfig
from gemma_jax.models.heads import HEAD_KEY, Score
from gemma_jax.models.kv_cache import Cache, LayerCache, attended, layer_cache
from gemma_jax.sharding import Layout

Array = jax.Array

ACT = ("act_batch", "act_length", "act_embed")


def init_cache(
    config: GemmaConfig, batch: int, max_len: int, dtype: Any = jnp.float32, layout: Layout | None = None, scan: bool = False
) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens (int8 with scales for dtype int8; laid
    out on `layout` when traced on a mesh): sliding-window layers hold at most `sliding_window` slots.

    Keyed "layer_{i}"; with `scan`, the layers the scan runs are stacked instead (see `scanned_layers`):
    "block_{j}" holds the caches of the layers at position j of every period, on a leading axis."""
    K, H = config.num_kv_heads, config.head_dim
    one = lambda kind: layer_cache(batch, min(config.sliding_window, max_len) if kind == "local" else max_len, K, H, dtype, layout)
    periods, _ = scanned_layers(config) if scan else (0, 0)
    stacked = {f"block_{j}": jax.vmap(lambda _, kind=kind: one(kind))(jnp.arange(periods)) for j, kind in enumerate(config.layer_pattern)}
    rest = {f"layer_{i}": one(kind) for i, kind in enumerate(config.layer_kinds) if i >= periods * len(config.layer_pattern)}
    return (stacked if periods else {}) | rest


def scanned_layers(config: GemmaConfig) -> tuple[int, int]:
    """(periods, first unrolled layer): the scan runs whole periods of `layer_pattern` (Gemma 1: one
    layer, Gemma 2: local + global, Gemma 3: 5 local + global); the layers after them, which do not fill
    a period (Gemma 3 1B: 26 = 4 x 6 + 2), run unrolled."""
    periods = config.num_layers // len(config.layer_pattern)
    return periods, periods * len(config.layer_pattern)


class Attention(nn.Module):
    config: GemmaConfig
    kind: str  # "local" (sliding window) or "global"
    param_dtype: Any = jnp.float32
    quant: str | None = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, segment_ids: Array, cache: LayerCache | None, fresh_cache: bool = False
    ) -> tuple[Array, LayerCache | None]:
        cfg = self.config
        N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
        proj = lambda name, shape, axes: Einsum(shape, axes, self.param_dtype, self.quant, self.kernels, name=name)
        q = proj("q", (N, H, D), ("q_heads", "head_dim", "embed"))("BTD,NHD->BTNH", x)
        k = proj("k", (K, H, D), ("kv_heads", "head_dim", "embed"))("BTD,KHD->BTKH", x)
        v = proj("v", (K, H, D), ("kv_heads", "head_dim", "embed"))("BTD,KHD->BTKH", x)
        if cfg.use_qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="k_norm")(k)
        base, scale = cfg.rope_for(self.kind)
        q = rope(q, positions, base, scale) * jnp.asarray(cfg.query_pre_attn_scalar**-0.5, x.dtype)
        k = rope(k, positions, base, scale)
        q = self.kernels.constrain(q, ("act_batch", "act_length", "act_heads", "head_dim"))

        att = attended(cache, k, v, positions, segment_ids, fresh_cache)
        window = cfg.sliding_window if self.kind == "local" else None
        record = lambda x: self.sow("intermediates", "max_abs_attn_logit", x)  # pre-cap, for tests
        out = attend(q, att, positions, segment_ids, window=window, soft_cap=cfg.attn_logit_softcap, kernels=self.kernels,
                     record=record)  # fmt: skip
        return proj("o", (D, N, H), ("embed", "q_heads", "head_dim"))("BTNH,DNH->BTD", out), att.cache


class MLP(nn.Module):
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

    config: GemmaConfig
    param_dtype: Any = jnp.float32
    quant: str | None = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        D, F = self.config.embed_dim, self.config.mlp_dim
        proj = lambda name, shape, axes: Einsum(shape, axes, self.param_dtype, self.quant, self.kernels, name=name)
        gate = proj("gate", (F, D), ("mlp", "embed"))("BTD,FD->BTF", x)
        up = proj("up", (F, D), ("mlp", "embed"))("BTD,FD->BTF", x)
        h = self.kernels.constrain(jax.nn.gelu(gate, approximate=True) * up, ("act_batch", "act_length", "act_mlp"))
        return proj("down", (D, F), ("embed", "mlp"))("BTF,DF->BTD", h)


class Block(nn.Module):
    """One decoder layer: attention and MLP, each pre-normed (and post-normed in Gemma 2/3) with a residual."""

    config: GemmaConfig
    kind: str
    param_dtype: Any = jnp.float32
    quant: str | None = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, fresh_cache):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.param_dtype, name=name)
        h, cache = Attention(cfg, self.kind, self.param_dtype, self.quant, self.kernels, name="attn")(
            norm("pre_attn_norm")(x), positions, segment_ids, cache, fresh_cache
        )
        x = x + (norm("post_attn_norm")(h) if cfg.use_post_norms else h)
        h = MLP(cfg, self.param_dtype, self.quant, self.kernels, name="mlp")(norm("pre_ffw_norm")(x))
        x = x + (norm("post_ffw_norm")(h) if cfg.use_post_norms else h)
        return self.kernels.constrain(x, ACT), cache



class Period(nn.Module):
    """One period of the layer pattern, "block_{j}" for its position j: the body of the layer scan."""

    config: GemmaConfig
    param_dtype: Any = jnp.float32
    quant: str | None = None
    remat: str = "none"
    kernels: Kernels = Kernels()
    fresh_cache: bool = False

    @nn.compact
    def __call__(self, x, caches, positions, segment_ids):
        new_caches = {}
        for j, kind in enumerate(self.config.layer_pattern):
            name = f"block_{j}"
            block = rematerialized(Block, self.remat, 5)(self.config, kind, self.param_dtype, self.quant, self.kernels, name=name)
            x, new_caches[name] = block(x, positions, segment_ids, None if caches is None else caches[name], self.fresh_cache)
        return x, new_caches if caches is not None else None


class Transformer(nn.Module):
    """Gemma decoder. Params are stored in `param_dtype`; activations are computed in `dtype`.

    `quant` ("w8a8" / "w8a16"): init creates int8 weights; apply with int8 params (see
    `gemma_jax.quant`) quantizes activations too for "w8a8" (int8 params run W8A16 otherwise).

    `scan`: the layers run as a `lax.scan` over whole periods of the layer pattern, so the program
    (and its compile time) does not grow with depth. Params are then "layers/block_{j}/..." with a
    leading "layers" axis (block j of every period; `Family.stack_layers` makes them from the
    per-layer "layer_{i}" tree checkpoints hold) plus "layer_{i}" for the layers after the last
    whole period; the cache is stacked alike (`init_cache(..., scan=True)`) and scanned as input and
    output. Costs measured on CPU (benchmarks/compile_layers.py): each step slices every layer's weights
    out of the stack, and the scan's cache output is copied into the donated cache once per call (a
    cache carried through the loop instead is copied whole every iteration unless tokens are written
    straight into the stacked arrays, which kv_cache.py's per-layer writes do not do).
    """

    config: GemmaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    quant: str | None = None
    remat: str = "none"  # training: which activations the backward pass recomputes (see layers.REMAT_POLICIES)
    kernels: Kernels = Kernels()  # backends and mesh layout of the program being traced
    scan: bool = False  # run whole periods of layers as one lax.scan (see above)

    @nn.compact
    def __call__(
        self,
        tokens: Array,  # B T int32
        positions: Array,  # B T int32
        segment_ids: Array,  # B T int32, 0 = padding
        cache: Cache | None = None,
        logits_index: Array | None = None,  # B: compute logits only at this position of each row
        fresh_cache: bool = False,  # the cache is empty: skip attending to it (prefill)
    ) -> tuple[Array, Cache | None]:
        """Returns float32 logits [B T V] (or [B V] with `logits_index`) and the updated cache.

        With a classification head (`config.head`), label scores [B T L] (or [B L]) instead of vocab logits.
        """
        cfg = self.config
        embedder = Embedder(cfg.vocab_size, cfg.embed_dim, self.param_dtype, self.quant, self.kernels, name="embedder")
        x = self.kernels.constrain(embedder.encode(tokens, self.dtype), ACT)  # B T D
        new_cache = {} if cache is not None else None
        periods, first = scanned_layers(cfg) if self.scan else (0, 0)
        if periods:
            scanned = nn.scan(
                Period, variable_axes={True: 0}, split_rngs={"params": True},  # every collection: params, LoRA, sown values
                in_axes=(0, nn.broadcast, nn.broadcast), length=periods, metadata_params={nn.PARTITION_NAME: LAYERS},
            )  # fmt: skip
            caches = None if cache is None else {f"block_{j}": cache[f"block_{j}"] for j in range(len(cfg.layer_pattern))}
            period = scanned(cfg, self.param_dtype, self.quant, self.remat, self.kernels, fresh_cache, name=LAYERS)
            x, caches = period(x, caches, positions, segment_ids)
            if cache is not None:
                new_cache.update(caches)
        for i, kind in enumerate(cfg.layer_kinds[first:], first):
            name = f"layer_{i}"
            x, layer_cache = rematerialized(Block, self.remat, 5)(cfg, kind, self.param_dtype, self.quant, self.kernels, name=name)(
                x, positions, segment_ids, None if cache is None else cache[name], fresh_cache
            )
            if cache is not None:
                new_cache[name] = layer_cache
        x = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="final_norm")(x)
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]  # B D
        if not cfg.head.is_lm:
            return Score(cfg.head, cfg.embed_dim, self.param_dtype, self.kernels, name=HEAD_KEY)(x), new_cache
        return soft_cap(embedder.decode(x), cfg.final_logit_softcap), new_cache
