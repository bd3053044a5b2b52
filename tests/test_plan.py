"""`gemma_jax.plan` predicts the per-device bytes that sharded loading and cache allocation really use."""

from __future__ import annotations

import subprocess

import jax
import jax.numpy as jnp
import pytest

import gemma_jax
from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.models.gemma.model import init_cache
from gemma_jax.models.kv_cache import CACHE_AXES
from gemma_jax.plan import CHIPS, format_plan, plan
from gemma_jax.sharding import INFERENCE, Layout, make_mesh, parse_mesh_spec, tree_shardings

MESHES = ["tensor=8", "fsdp=2,tensor=4", "data=2,fsdp=2,tensor=2"]
HEADS = {"heads-divide": dict(num_attention_heads=8, num_key_value_heads=8, head_dim=8, vocab_size=128),
         "heads-do-not-divide": dict(num_attention_heads=4, num_key_value_heads=2)}  # fmt: skip


def _per_device(tree) -> int:
    """Largest per-device sum of shard bytes over the arrays of `tree`."""
    totals: dict = {}
    for leaf in jax.tree.leaves(tree):
        for s in leaf.addressable_shards:
            totals[s.device] = totals.get(s.device, 0) + s.data.nbytes
    return max(totals.values())


@pytest.fixture(scope="module", params=list(HEADS))
def model_path(request, hf_checkpoint):
    return hf_checkpoint("gemma2", **HEADS[request.param])[1]


@pytest.mark.parametrize("spec", MESHES)
def test_param_bytes_match_loaded_shards(model_path, spec):
    model = gemma_jax.load(model_path, dtype="float32", mesh=make_mesh(spec))
    got = plan(model.config, parse_mesh_spec(spec, 8), chip="v5e", batch=4, seq=24, param_dtype="float32")
    assert got.param_bytes == _per_device(model.params)  # exact: same axes, same fallback


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("batch", [4, 3])  # 3 rows do not split over data/fsdp: replicated
def test_cache_bytes_match_allocated_cache(model_path, spec, batch):
    config = gemma_jax.load(model_path, dtype="float32").config
    seq = 24  # > sliding_window (8): local layers keep 8 slots, global ones 24
    make = lambda: init_cache(config, batch, seq, jnp.float32)
    shapes = jax.eval_shape(make)
    layout = Layout(make_mesh(spec), INFERENCE)
    axes = {k: {kind: CACHE_AXES[kind] for kind in layer} for k, layer in shapes.items()}
    cache = jax.jit(make, out_shardings=tree_shardings(layout, axes, shapes))()
    got = plan(config, parse_mesh_spec(spec, 8), chip="v5e", batch=batch, seq=seq, param_dtype="float32")
    assert got.cache_bytes == _per_device(cache)


def test_gemma2_27b_on_eight_v5e_chips():
    config = GemmaConfig.from_preset("gemma2-27b")
    bf16 = plan(config, {"tensor": 8}, chip="v5e", batch=8, seq=8192)
    assert bf16.param_bytes == pytest.approx(27.2e9 * 2 / 8, rel=0.03)
    # 46 layers x [8, slots, 16/8 kv heads, 128] x (k, v) x 2 bytes; half the layers keep a 4096 window
    assert bf16.cache_bytes == pytest.approx(23 * (8192 + 4096) * 8 * 2 * 128 * 2 * 2, rel=0.01)
    assert bf16.hbm_bytes == CHIPS["v5e"].hbm and bf16.decode_bound == "memory"
    # Memory-bound decode: about batch x bandwidth / bytes read (weights + half the cache) per step.
    step = (bf16.param_bytes + bf16.cache_bytes / 2) / 819e9
    assert bf16.decode_tokens_per_s == pytest.approx(8 / step, rel=0.05)
    # Compute-bound prefill: at least 2 FLOPs per weight per token, at most the whole peak.
    assert 1e4 < bf16.prefill_tokens_per_s < 197e12 * 8 / (2 * 27.2e9)
    assert bf16.prefill_rows_fit >= 8 and bf16.fits  # splash attention: no [T T] logits
    dense = plan(config, {"tensor": 8}, chip="v5e", batch=8, seq=8100)  # not whole 128-blocks: dense XLA attention
    assert 0 < dense.prefill_rows_fit < 8 and not dense.fits  # f32 [B N T T] logits: prefill in micro-batches

    int8 = plan(config, {"tensor": 8}, chip="v5e", batch=8, seq=8192, quant="w8a16")
    assert 0.45 < int8.param_bytes / bf16.param_bytes < 0.53  # int8 everywhere, the embedding included
    assert int8.decode_tokens_per_s > 1.3 * bf16.decode_tokens_per_s
    assert int8.cache_bytes == bf16.cache_bytes
    # Training rules split every weight's embed dim over fsdp: stored like tensor=8, but each
    # decode step multiplies (so reads) the gathered weights.
    fsdp = plan(config, {"fsdp": 8}, chip="v5e", batch=8, seq=8192, rules="training")
    assert fsdp.param_bytes == pytest.approx(bf16.param_bytes, rel=0.01)
    assert fsdp.decode_tokens_per_s < bf16.decode_tokens_per_s / 4
    text = format_plan(int8)
    assert "params" in text and "w8a16" in text and "collective" in text


def test_a_model_that_cannot_fit_says_so():
    config = GemmaConfig.from_preset("gemma2-27b")
    single = plan(config, {}, chip="v5e", batch=1, seq=128)  # 54 GB of weights on a 16 GiB chip
    assert not single.fits and single.headroom_bytes < -30 * 2**30 and single.prefill_rows_fit == 0
    assert "NO" in format_plan(single)
    small = plan(GemmaConfig.from_preset("gemma2-2b"), {}, chip="h100", batch=1, seq=1024)
    assert small.fits and small.headroom_bytes > 60 * 2**30


def test_bad_arguments_are_rejected():
    config = GemmaConfig.from_preset("gemma2-2b")
    for kwargs in (dict(chip="tpu9"), dict(chip="v5e", quant="int4")):
        with pytest.raises(ValueError):
            plan(config, {}, batch=1, seq=16, **kwargs)
    with pytest.raises(ValueError):
        plan(config, {"model": 2}, chip="v5e", batch=1, seq=16)


@pytest.mark.parametrize("args, message", [
    (["--model", "gemma2-2b", "--batch", "-1", "--seq", "0"], "batch and seq must be at least 1"),
    (["--model", "../finetune/lora"], "unknown model preset '../finetune/lora'; known: gemma-2b"),
])  # fmt: skip
def test_plan_cli_rejects_bad_arguments_in_one_line(args, message):
    done = subprocess.run(["gemma-jax", "plan", "--mesh", "tensor=1", "--chip", "v5e", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and done.stderr.startswith("gemma-jax plan: error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
