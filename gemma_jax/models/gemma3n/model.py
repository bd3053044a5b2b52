"""The Gemma 3n text decoder as Flax modules, with the Gemma family's call signature and cache.

Shapes use named dims as in `gemma_jax/models/gemma/model.py` (B batch, T query length, S key length, D embed,
N query heads, K kv heads, H head dim, F a layer's mlp dim, V vocab), plus A AltUp streams,
L layers, P the per-layer-input width, E = L * P, R the LAuReL rank. Weights are stored
[out..., in...] as in Hugging Face checkpoints.

What differs from Gemma 1-3, all from `transformers`' `Gemma3nForCausalLM`:
- AltUp: the residual stream is A streams [A B T D]. Stream 0 is the scaled embedding, the others
  learned projections of it at the same root-mean-square. Each layer predicts every stream from
  all of them (router-weighted A x A mixing), runs on the active stream, then corrects every
  stream by the layer's innovation. At the end the streams are projected back and averaged.
- Per-layer inputs (PLE): a second token embedding [W E] gives each layer a P-wide input, added
  to a projection of the embedding; each layer gates it by its output and adds it to streams 1..A-1.
- LAuReL: a rank-R residual branch beside attention, averaged with it (divided by sqrt 2).
- Norms multiply by the stored scale (no 1 +); values are RMS-normed without a scale; queries
  are not scaled (q/k norms take that role); MLP widths differ per layer; the first layers'
  MLP gate keeps only what lies above a Gaussian quantile of each row (activation sparsity).
- KV sharing: the last `num_kv_shared_layers` layers compute no keys or values and attend over
  those of the last earlier layer of their kind (`Gemma3nConfig.kv_source`). A sharing layer
  reuses exactly what its source attended over (the whole chunk in a prefill, cache plus chunk
  after it, the cache in a decode step), so prefill + decode equals the full forward and the
  cache holds entries only for the layers that compute keys and values.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_jax.kernels import Kernels
from gemma_jax.layers import Einsum, Embedder, PlainRMSNorm, rematerialized, rms_normalize, rope, soft_cap
from gemma_jax.models.attention import attend
from gemma_jax.models.gemma.model import ACT
from gemma_jax.models.gemma3n.config import Gemma3nConfig
from gemma_jax.models.kv_cache import Attended, Cache, LayerCache, attended, layer_cache
from gemma_jax.sharding import Layout

Array = jax.Array
STREAMS = (None,) + ACT  # A B T D: the AltUp streams stay whole on every device


def init_cache(config: Gemma3nConfig, batch: int, max_len: int, dtype: Any = jnp.float32, layout: Layout | None = None) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens (see models/kv_cache.py: int8 for
    dtype int8; on `layout` when traced on a mesh), for the layers that compute their own keys and values
    only: KV-sharing layers read their source layer's entry."""
    K, H = config.num_kv_heads, config.head_dim
    return {
        f"layer_{i}": layer_cache(batch, min(config.sliding_window, max_len) if kind == "local" else max_len, K, H, dtype, layout)
        for i, kind in enumerate(config.layer_kinds)
        if config.kv_source(i) == i
    }


def gaussian_top_k(x: Array, sparsity: float) -> Array:
    """Activation sparsity: relu(x - cutoff), the cutoff being the `sparsity` quantile of a normal
    fitted to each row (mean + std * Φ⁻¹(sparsity), over the last axis)."""
    multiplier = jnp.asarray(statistics.NormalDist().inv_cdf(sparsity), x.dtype)
    mean, std = jnp.mean(x, axis=-1, keepdims=True), jnp.std(x, axis=-1, keepdims=True)
    return jax.nn.relu(x - (mean + std * multiplier))


def match_magnitude(x: Array, target: Array) -> Array:
    """x rescaled to the root-mean-square `target` [..., 1] (AltUp's extra streams keep stream 0's scale)."""
    return x * target / jnp.sqrt(jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True), 1e-5))


def _rms(x: Array) -> Array:
    return jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True))


class Attention(nn.Module):
    config: Gemma3nConfig
    layer: int
    param_dtype: Any = jnp.float32
    quant: str | None = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, segment_ids: Array, cache: LayerCache | None, fresh_cache: bool, shared: Attended | None
    ) -> tuple[Array, LayerCache | None, Attended]:
        """`shared`: what the source layer attended over, on a KV-sharing layer (None on a layer with its own)."""
        cfg = self.config
        N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
        kind = cfg.layer_kinds[self.layer]
        base, _ = cfg.rope_for(kind)
        proj = lambda name, shape, axes: Einsum(shape, axes, self.param_dtype, self.quant, self.kernels, name=name)
        norm = lambda name: PlainRMSNorm(cfg.rms_norm_eps, self.param_dtype, name=name)
        q = proj("q", (N, H, D), ("q_heads", "head_dim", "embed"))("BTD,NHD->BTNH", x)
        q = self.kernels.constrain(rope(norm("q_norm")(q), positions, base), ("act_batch", "act_length", "act_heads", "head_dim"))
        if shared is None:
            k = proj("k", (K, H, D), ("kv_heads", "head_dim", "embed"))("BTD,KHD->BTKH", x)
            v = proj("v", (K, H, D), ("kv_heads", "head_dim", "embed"))("BTD,KHD->BTKH", x)
            k = rope(norm("k_norm")(k), positions, base)
            v = rms_normalize(v, cfg.rms_norm_eps).astype(v.dtype)  # no scale
            shared = attended(cache, k, v, positions, segment_ids, fresh_cache)
        # Unscaled (the q/k norms take that role) and uncapped.
        window = cfg.sliding_window if kind == "local" else None
        out = attend(q, shared, positions, segment_ids, window=window, soft_cap=None, kernels=self.kernels)
        return proj("o", (D, N, H), ("embed", "q_heads", "head_dim"))("BTNH,DNH->BTD", out), shared.cache, shared


class MLP(nn.Module):
    """GeGLU feed-forward of this layer's width, its gate sparsified on the layers that ask for it."""

    config: Gemma3nConfig
    layer: int
    param_dtype: Any = jnp.float32
    quant: str | None = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        D, F = self.config.embed_dim, self.config.mlp_dim[self.layer]
        sparsity = self.config.activation_sparsity[self.layer]
        gate = Einsum((F, D), ("mlp", "embed"), self.param_dtype, self.quant, self.kernels, name="gate")("BTD,FD->BTF", x)
        if sparsity > 0:
            gate = gaussian_top_k(gate, sparsity)
        up = Einsum((F, D), ("mlp", "embed"), self.param_dtype, self.quant, self.kernels, name="up")("BTD,FD->BTF", x)
        h = self.kernels.constrain(jax.nn.gelu(gate, approximate=True) * up, ("act_batch", "act_length", "act_mlp"))
        return Einsum((D, F), ("embed", "mlp"), self.param_dtype, self.quant, self.kernels, name="down")("BTF,DF->BTD", h)


class Laurel(nn.Module):
    """Learned augmented residual: x + norm(right(left(x))), through rank R."""

    config: Gemma3nConfig
    param_dtype: Any = jnp.float32
    quant: str | None = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        D, R = self.config.embed_dim, self.config.laurel_rank
        h = Einsum((R, D), ("laurel", "embed"), self.param_dtype, self.quant, self.kernels, name="left")("BTD,RD->BTR", x)
        h = Einsum((D, R), ("embed", "laurel"), self.param_dtype, self.quant, self.kernels, name="right")("BTR,DR->BTD", h)
        return x + PlainRMSNorm(self.config.rms_norm_eps, self.param_dtype, name="norm")(h)


class AltUp(nn.Module):
    """One layer's AltUp: `predict` mixes the streams before the layer, `correct` spreads its output after.

    Both weight the mixing by a router over the active stream (tanh of a projection of its norm).
    The coefficient weights are clipped to ±altup_coef_clip, as in training (checkpoints hold them clipped).
    """

    config: Gemma3nConfig
    param_dtype: Any = jnp.float32
    kernels: Kernels = Kernels()

    def setup(self) -> None:
        cfg, A, D = self.config, self.config.altup_num_inputs, self.config.embed_dim
        self.router = Einsum((A, D), ("altup", "embed"), self.param_dtype, kernels=self.kernels)  # tiny: kept in float
        self.router_norm = PlainRMSNorm(cfg.rms_norm_eps, self.param_dtype)
        zeros = lambda axes: nn.with_logical_partitioning(nn.initializers.zeros, axes)
        # predict_coefs[p, q, r]: how much stream q feeds the prediction of stream p, per router output r.
        self.predict_coefs = self.param("predict_coefs", zeros(("altup", "altup", "altup")), (A, A, A), self.param_dtype)
        self.correct_coefs = self.param("correct_coefs", zeros(("altup", "altup")), (A, A), self.param_dtype)
        self.correct_scale = self.param("correct_scale", zeros(("norm",)), (D,), self.param_dtype)

    def _modalities(self, x: Array) -> Array:
        routed = self.router("BTD,AD->BTA", self.router_norm(x) * jnp.asarray(1.0 / self.config.embed_dim, x.dtype))
        return jnp.tanh(routed.astype(jnp.float32)).astype(x.dtype)  # B T A

    def _clip(self, w: Array, dtype: Any) -> Array:
        c = self.config.altup_coef_clip
        return (w if c is None else jnp.clip(w, -c, c)).astype(dtype)

    def predict(self, streams: Array) -> Array:
        """[A B T D] -> the predicted streams [A B T D]."""
        modalities = self._modalities(streams[self.config.altup_active_idx])
        coefs = jnp.einsum("BTR,PQR->BTPQ", modalities, self._clip(self.predict_coefs, streams.dtype))
        return streams + jnp.einsum("QBTD,BTPQ->PBTD", streams, coefs)

    def correct(self, predictions: Array, activated: Array) -> Array:
        """Add the layer's innovation (its output [B T D] minus the active prediction) to every stream."""
        modalities = self._modalities(activated)
        innovation = activated - predictions[self.config.altup_active_idx]
        coefs = jnp.einsum("BTR,PR->PBT", modalities, self._clip(self.correct_coefs, activated.dtype)) + 1.0
        return predictions + innovation[None] * coefs[..., None]

    def scale_output(self, x: Array) -> Array:
        return x * self.correct_scale.astype(x.dtype)


class Block(nn.Module):
    """One decoder layer over the AltUp streams: predict, attention + LAuReL + MLP on the active
    stream, correct, then add the gated per-layer input to streams 1..A-1."""

    config: Gemma3nConfig
    layer: int
    param_dtype: Any = jnp.float32
    quant: str | None = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, streams, per_layer_input, positions, segment_ids, cache, fresh_cache, shared):
        cfg, D, P = self.config, self.config.embed_dim, self.config.per_layer_dim
        norm = lambda name: PlainRMSNorm(cfg.rms_norm_eps, self.param_dtype, name=name)
        altup = AltUp(cfg, self.param_dtype, self.kernels, name="altup")
        predictions = altup.predict(streams)
        active = predictions[cfg.altup_active_idx]
        x = norm("pre_attn_norm")(active)
        laurel = Laurel(cfg, self.param_dtype, self.quant, self.kernels, name="laurel")(x)
        h, cache, kv = Attention(cfg, self.layer, self.param_dtype, self.quant, self.kernels, name="attn")(
            x, positions, segment_ids, cache, fresh_cache, shared
        )
        x = (active + norm("post_attn_norm")(h) + laurel) / math.sqrt(2.0)
        h = MLP(cfg, self.layer, self.param_dtype, self.quant, self.kernels, name="mlp")(norm("pre_ffw_norm")(x))
        x = self.kernels.constrain(x + norm("post_ffw_norm")(h), ACT)
        corrected = altup.correct(predictions, x)

        first = corrected[cfg.altup_active_idx]
        if cfg.altup_correct_scale:
            first = altup.scale_output(first)
        proj = lambda name, shape, axes: Einsum(shape, axes, self.param_dtype, self.quant, self.kernels, name=name)
        gate = proj("ple_gate", (P, D), ("per_layer", "embed"))("BTD,PD->BTP", first)
        h = proj("ple_proj", (D, P), ("embed", "per_layer"))("BTP,DP->BTD", jax.nn.gelu(gate, approximate=True) * per_layer_input)
        corrected = corrected.at[1:].add(norm("post_ple_norm")(h))
        return self.kernels.constrain(corrected, STREAMS), cache, kv


class Transformer(nn.Module):
    """Gemma 3n text decoder; the same constructor and call as the Gemma family's `Transformer`."""

    config: Gemma3nConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    quant: str | None = None
    remat: str = "none"
    kernels: Kernels = Kernels()  # backends and mesh layout of the program being traced

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
        """Returns float32 logits [B T V] (or [B V] with `logits_index`) and the updated cache."""
        cfg = self.config
        embedder = Embedder(cfg.vocab_size, cfg.embed_dim, self.param_dtype, self.quant, self.kernels, name="embedder")
        x = self.kernels.constrain(embedder.encode(tokens, self.dtype), ACT)  # B T D
        per_layer = self._per_layer_inputs(tokens, x)  # B T L P
        target = _rms(x)
        D = cfg.embed_dim
        square = lambda name: Einsum((D, D), ("embed", "embed"), self.param_dtype, self.quant, self.kernels, name=name)
        extra = [square(f"altup_proj_{j}")("BTD,ED->BTE", x) for j in range(cfg.altup_num_inputs - 1)]
        streams = self.kernels.constrain(jnp.stack([x] + [match_magnitude(e, target) for e in extra]), STREAMS)  # A B T D

        read_by_others = {cfg.kv_source(i) for i in range(cfg.num_layers) if cfg.kv_source(i) != i}
        new_cache, shared_kv = ({} if cache is not None else None), {}
        for i in range(cfg.num_layers):
            name, source = f"layer_{i}", cfg.kv_source(i)
            owns = source == i
            block = rematerialized(Block, self.remat, 6)(cfg, i, self.param_dtype, self.quant, self.kernels, name=name)
            streams, layer_cache, kv = block(
                streams, per_layer[:, :, i], positions, segment_ids, cache[name] if cache is not None and owns else None,
                fresh_cache, None if owns else shared_kv[source],
            )
            if i in read_by_others:
                shared_kv[i] = kv
            if new_cache is not None and owns:
                new_cache[name] = layer_cache

        if logits_index is not None:
            streams = jnp.take_along_axis(streams, logits_index[None, :, None, None], axis=2)  # A B 1 D
        target = _rms(streams[0])
        back = [square(f"altup_unembed_{j}")("BTD,ED->BTE", streams[j + 1]) for j in range(cfg.altup_num_inputs - 1)]
        x = jnp.mean(jnp.stack([streams[0]] + [match_magnitude(b, target) for b in back]), axis=0)
        x = PlainRMSNorm(cfg.rms_norm_eps, self.param_dtype, name="final_norm")(x)
        logits = soft_cap(embedder.decode(x), cfg.final_logit_softcap)
        return (logits if logits_index is None else logits[:, 0]), new_cache

    def _per_layer_inputs(self, tokens: Array, x: Array) -> Array:
        """Each layer's P-wide input [B T L P]: (its per-layer token embedding + the normed projection of
        the embedding x) / sqrt 2. Ids outside the per-layer table read row 0."""
        cfg = self.config
        (B, T), L, P = tokens.shape, cfg.num_layers, cfg.per_layer_dim
        table = Embedder(cfg.per_layer_vocab_size, L * P, self.param_dtype, self.quant, self.kernels, P**0.5,
                         name="per_layer_embedder")
        ids = jnp.where((tokens >= 0) & (tokens < cfg.per_layer_vocab_size), tokens, 0)
        embedded = table.encode(ids, self.dtype).reshape(B, T, L, P)
        proj = Einsum((L * P, cfg.embed_dim), ("per_layer", "embed"), self.param_dtype, self.quant, self.kernels,
                      name="per_layer_proj")
        projected = proj("BTD,ED->BTE", x) * jnp.asarray(cfg.embed_dim**-0.5, x.dtype)
        projected = PlainRMSNorm(cfg.rms_norm_eps, self.param_dtype, name="per_layer_proj_norm")(projected.reshape(B, T, L, P))
        return (projected + embedded) * jnp.asarray(2.0**-0.5, x.dtype)
