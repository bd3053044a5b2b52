"""Scanned layers (`load(..., scan=True)`): the same logits and greedy tokens as the unrolled model, for every
layer pattern (with a remainder that does not fill a period), int8 and sharded; checkpoints stay per layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import gemma_jax
from gemma_jax.checkpoint.hf import save_hf
from gemma_jax.checkpoint.orbax import save_orbax
from gemma_jax.checkpoint.source import params_source
from gemma_jax.models import family_of
from gemma_jax.models.family import LAYERS
from gemma_jax.sharding import make_mesh

ROWS = [list(range(2, 30)), [2, 7, 9]]
PROMPTS = [[2, 5, 17, 33], [2, 40, 41, 42, 43, 44, 45, 46, 47], [2, 9]]
# (model type, overrides): Gemma 1 (period 1), Gemma 2 (local/global pairs: 2 periods + 1 layer unrolled),
# Gemma 3 (local, local, global: 2 periods + 1 layer unrolled).
PATTERNS = {
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", dict(num_hidden_layers=5)),
    "gemma3": ("gemma3_text", dict(num_hidden_layers=7, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2
                                   + ["sliding_attention"])),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(PATTERNS))
def checkpoint(request, hf_checkpoint):
    model_type, overrides = PATTERNS[request.param]
    return hf_checkpoint(model_type, seed=8, weight_scale=1.5, post_norm_offset=10.0, **overrides)[1]


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_scanned_logits_and_greedy_tokens_equal_unrolled(checkpoint):
    unrolled, scanned = gemma_jax.load(checkpoint, dtype="float32", scan=False), gemma_jax.load(checkpoint, dtype="float32")
    assert scanned.runtime.scan and not unrolled.runtime.scan
    periods, first = family_of(scanned.config).scanned_layers(scanned.config)
    assert periods >= 2 and first == periods * len(scanned.config.layer_pattern)
    assert all(leaf.shape[0] == periods for leaf in jax.tree.leaves(scanned.params[LAYERS]))
    assert ("layer_0" in scanned.params) is False and (f"layer_{first}" in scanned.params) == (first < scanned.config.num_layers)
    close(scanned.logits(ROWS), unrolled.logits(ROWS))
    # prefill + decode through the stacked cache (the Gemma 2/3 windows of 8 wrap during the 20 steps)
    assert scanned.generate(PROMPTS, max_new_tokens=20) == unrolled.generate(PROMPTS, max_new_tokens=20)


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_scanned_int8_params_and_cache_equal_unrolled(checkpoint, kv_cache):
    load = lambda scan: gemma_jax.load(checkpoint, dtype="float32", quant="w8a16", kv_cache=kv_cache, scan=scan)
    unrolled, scanned = load(False), load(True)
    assert scanned.params[LAYERS]["block_0"]["mlp"]["gate"]["w"].dtype == jnp.int8
    close(scanned.logits(ROWS), unrolled.logits(ROWS))
    assert scanned.generate(PROMPTS, max_new_tokens=12) == unrolled.generate(PROMPTS, max_new_tokens=12)


def test_scanned_sharded_equals_unrolled_single_device(checkpoint):
    unrolled = gemma_jax.load(checkpoint, dtype="float32", scan=False)
    sharded = gemma_jax.load(checkpoint, dtype="float32", mesh=make_mesh("fsdp=2,tensor=4"))
    gate = sharded.params[LAYERS]["block_0"]["mlp"]["gate"]["w"]  # [layers F D]: F split over tensor, layers whole
    assert {s.data.shape for s in gate.addressable_shards} == {(gate.shape[0], gate.shape[1] // 4, gate.shape[2])}
    close(sharded.logits(ROWS), unrolled.logits(ROWS))
    assert sharded.generate(PROMPTS, max_new_tokens=12) == unrolled.generate(PROMPTS, max_new_tokens=12)


def test_checkpoints_stay_per_layer(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scanned = gemma_jax.load(checkpoint, dtype="float32")
    # saved from the stacked tree: the same per-layer tensors, bit for bit
    save_hf("saved", scanned.config, scanned.params)
    original, saved = load_file(checkpoint / "model.safetensors"), load_file("saved/model.safetensors")
    assert sorted(saved) == sorted(original)
    for name, x in original.items():
        np.testing.assert_array_equal(saved[name], x, err_msg=name)
    # an Orbax checkpoint written per layer (by the unrolled model, as before scanning existed) loads scanned
    unrolled = gemma_jax.load(checkpoint, dtype="float32", scan=False)
    save_orbax(tmp_path / "orbax", params_source(unrolled.config, unrolled.params))
    close(gemma_jax.load(tmp_path / "orbax", dtype="float32").logits(ROWS), unrolled.logits(ROWS))


def test_stack_then_unstack_is_the_identity(checkpoint):
    unrolled = gemma_jax.load(checkpoint, dtype="float32", scan=False)
    family, config = family_of(unrolled.config), unrolled.config
    copy = jax.tree.map(lambda x: x, unrolled.params)
    stacked = family.stack_layers(config, copy)
    assert copy == {}  # the per-layer leaves were moved out as they were stacked
    back = family.unstack_layers(config, stacked)
    assert jax.tree.structure(back) == jax.tree.structure(unrolled.params)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), back, unrolled.params)))
