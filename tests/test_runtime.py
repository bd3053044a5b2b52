"""One static key per compiled program: switching kernels or mesh between calls on one model compiles
(once) and runs exactly the program asked for, with nothing read from global state at trace time."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from gemma_jax import api
from gemma_jax.kernels import Kernels
from gemma_jax.models import init_params, param_axes
from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.quant import quantize_params
from gemma_jax.sharding import INFERENCE, Layout, make_mesh, tree_shardings

CONFIG = GemmaConfig(
    model_type="gemma2", vocab_size=256, embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
    mlp_dim=256, query_pre_attn_scalar=32, layer_pattern=("local", "global"), sliding_window=8, use_post_norms=True,
    attn_logit_softcap=50.0, final_logit_softcap=30.0,
)  # fmt: skip


def test_switching_backend_and_mesh_between_calls_runs_what_each_call_asks_for():
    params = quantize_params(CONFIG, init_params(CONFIG, jax.random.PRNGKey(0)), "w8a16")
    model = api.Gemma(CONFIG, params, quant="w8a16", compute_dtype="float32")
    layout = Layout(make_mesh("data=2,tensor=4"), INFERENCE)
    placed = jax.device_put(params, tree_shardings(layout, param_axes(CONFIG, "w8a16"), params))
    rows = np.random.RandomState(0).randint(1, CONFIG.vocab_size, (2, 16)).astype(np.int32)
    tokens, segments = rows, np.ones_like(rows)
    xla = model.runtime
    assert xla.kernels == Kernels(int8="xla", attention="xla", interpret=True)  # CPU: the platform defaults
    cases = [  # (kernels, params on their devices, Pallas int8 kernels in the program?, run per shard?)
        (xla.kernels, params, False, False),
        (Kernels(int8="tpu", interpret=True), params, True, False),
        (Kernels(layout, int8="tpu", interpret=True), placed, True, True),
        (Kernels(layout, int8="xla", interpret=True), placed, False, False),
        (xla.kernels, params, False, False),  # back to the first: its program again, no new compilation
    ]
    want, seen = model.logits(rows), {xla}  # `logits` compiled the first runtime's program for these shapes
    for kernels, on_devices, pallas, per_shard in cases:
        runtime = dataclasses.replace(xla, kernels=kernels)
        program = str(jax.make_jaxpr(functools.partial(api._forward, runtime=runtime))(on_devices, tokens, segments))
        assert ("pallas_call" in program) == pallas and ("shard_map" in program) == per_shard, kernels
        before = api._forward._cache_size()
        got = np.asarray(api._forward(on_devices, tokens, segments, runtime=runtime))
        assert api._forward._cache_size() - before == (runtime not in seen)  # compiled once per runtime
        seen.add(runtime)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
