"""Splash attention (Pallas, interpret mode on CPU) against the dense XLA attention: kernel, model, mesh, TPU lowering."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.kernels import Kernels
from gemma_jax.kernels.attention import splash_applies
from gemma_jax.models.gemma.model import Transformer
from gemma_jax.models import init_params, param_axes
from gemma_jax.sharding import INFERENCE, Layout, make_mesh, tree_shardings

CONFIG = GemmaConfig(
    model_type="gemma2", vocab_size=128, embed_dim=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=32,
    mlp_dim=128, query_pre_attn_scalar=32, layer_pattern=("local", "global"), sliding_window=48, use_post_norms=True,
    attn_logit_softcap=5.0, final_logit_softcap=30.0,
)  # fmt: skip  -- a low attention cap (5) so logits really pass it; window 48 << T = 256


def _batch():
    """Row 0: two packed documents (positions restart); row 1: right-padded after 200 tokens."""
    T = 256
    tokens = np.random.RandomState(0).randint(1, CONFIG.vocab_size, (2, T)).astype(np.int32)
    segments = np.ones((2, T), np.int32)
    segments[0, 100:], segments[1, 200:] = 2, 0
    positions = np.tile(np.arange(T, dtype=np.int32), (2, 1))
    positions[0, 100:] -= 100
    return tokens, positions, segments


SPLASH = Kernels(attention="splash", interpret=True)


def _forward(params, tokens, positions, segments, kernels=Kernels()):
    return Transformer(CONFIG, kernels=kernels).apply({"params": params}, tokens, positions, segments)[0]


@pytest.fixture(scope="module")
def params():
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    return jax.tree.map(lambda x: x * 4 if x.ndim == 3 else x, params)  # larger q/k: attention logits past the cap


def test_splash_applies_on_tpu_by_default_and_to_whole_blocks():
    assert not splash_applies(256, Kernels.for_platform())  # CPU default: dense XLA
    assert splash_applies(256, SPLASH) and splash_applies(1024, SPLASH) and not splash_applies(200, SPLASH)
    with pytest.raises(ValueError, match="attention"):
        Kernels(attention="flash")


def test_model_logits_and_gradients_equal_dense(params):
    tokens, positions, segments = _batch()
    valid = segments > 0
    want = jax.jit(_forward)(params, tokens, positions, segments)
    splash = functools.partial(_forward, kernels=SPLASH)
    program = str(jax.make_jaxpr(splash)(params, tokens, positions, segments))
    got = jax.jit(splash)(params, tokens, positions, segments)
    assert "pallas_call" in program and "2,4,2,256,256]" not in program  # no dense [B K G T S] logits
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=1e-5, atol=1e-5)

    def loss(params, tokens, positions, segments, kernels=Kernels()):
        logits = _forward(params, tokens, positions, segments, kernels)
        return jnp.sum(jnp.where(segments[..., None] > 0, jax.nn.log_softmax(logits), 0.0)) / segments.size

    want = jax.jit(jax.grad(loss))(params, tokens, positions, segments)
    got = jax.jit(jax.grad(functools.partial(loss, kernels=SPLASH)))(params, tokens, positions, segments)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("spec", ["data=2,tensor=4", "tensor=8"])  # 4 kv heads: split on tensor=4, not on 8
def test_sharded_splash_equals_one_device(params, spec):
    tokens, positions, segments = _batch()
    layout = Layout(make_mesh(spec), INFERENCE)
    placed = jax.device_put(params, tree_shardings(layout, param_axes(CONFIG), params))
    want = jax.jit(_forward)(params, tokens, positions, segments)
    forward = functools.partial(_forward, kernels=Kernels(layout, attention="splash", interpret=True))
    assert "shard_map" in str(jax.make_jaxpr(forward)(placed, tokens, positions, segments))
    got = jax.jit(forward)(placed, tokens, positions, segments)
    valid = segments > 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=1e-5, atol=1e-5)


def test_gemma2_prefill_lowers_to_splash_for_tpu():
    """Gemma 2 9B dims (2 layers), a 2048-token prefill: both layer kinds export as Mosaic kernels, no dense logits."""
    config = GemmaConfig.from_preset("gemma2-9b").replace(num_layers=2)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), jnp.bfloat16))
    net = Transformer(config, jnp.bfloat16, jnp.bfloat16, kernels=Kernels(attention="splash", interpret=False))

    def forward(params, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return net.apply({"params": params}, tokens, positions, jnp.ones_like(tokens))[0]

    exported = jax.export.export(jax.jit(forward), platforms=("tpu",))(params, jax.ShapeDtypeStruct((1, 2048), jnp.int32))
    text = exported.mlir_module()
    assert text.count("tpu_custom_call") >= 2 and "2048x2048" not in text
