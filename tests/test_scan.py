"""Scanned layers (`load(..., scan=True)`, `scan=true` in training): the same logits and greedy tokens as the unrolled model, for every
layer pattern (with a remainder that does not fill a period), int8 and sharded; checkpoints stay per layer."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import gemma_jax
from gemma_jax.checkpoint.hf import save_hf
from gemma_jax.checkpoint.orbax import save_orbax
from gemma_jax.checkpoint.source import params_source
from gemma_jax.engine import Engine, Request
from gemma_jax.models import family_of
from gemma_jax.models.family import LAYERS
from gemma_jax.sampling import Sampler
from gemma_jax.sharding import make_mesh
from gemma_jax.train.config import TrainConfig
from gemma_jax.train.run import finetune
from gemma_jax.models.heads import SEQUENCE
from test_gemma3n import CASES, make_hf_model as make_gemma3n  # same-directory test modules
from test_heads import make_classifier

ROWS = [list(range(2, 30)), [2, 7, 9]]
PROMPTS = [[2, 5, 17, 33], [2, 40, 41, 42, 43, 44, 45, 46, 47]]
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


@pytest.fixture(scope="module")
def gemma3(hf_checkpoint):
    """The Gemma 3 pattern with a remainder: (checkpoint, the unrolled model)."""
    model_type, overrides = PATTERNS["gemma3"]
    path = hf_checkpoint(model_type, seed=8, weight_scale=1.5, post_norm_offset=10.0, **overrides)[1]
    return path, gemma_jax.load(path, dtype="float32")


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_scanned_logits_and_greedy_tokens_equal_unrolled(checkpoint):
    unrolled, scanned = gemma_jax.load(checkpoint, dtype="float32"), gemma_jax.load(checkpoint, dtype="float32", scan=True)
    assert scanned.runtime.scan and not unrolled.runtime.scan
    periods, first = family_of(scanned.config).scanned_layers(scanned.config)
    assert periods >= 2 and first == periods * len(scanned.config.layer_pattern)
    assert all(leaf.shape[0] == periods for leaf in jax.tree.leaves(scanned.params[LAYERS]))
    assert ("layer_0" in scanned.params) is False and (f"layer_{first}" in scanned.params) == (first < scanned.config.num_layers)
    close(scanned.logits(ROWS), unrolled.logits(ROWS))
    # prefill + decode through the stacked cache (the Gemma 2/3 windows of 8 wrap during the 12 steps)
    assert scanned.generate(PROMPTS, max_new_tokens=12) == unrolled.generate(PROMPTS, max_new_tokens=12)


def test_the_paged_engine_runs_a_scanned_model_as_unrolled(gemma3):
    """The engine's pools and tables stack like the scanned cache: the same greedy tokens, rings wrapping."""
    out = {}
    for scan in (False, True):
        model = gemma_jax.load(gemma3[0], dtype="float32", scan=scan)
        prompts = np.random.RandomState(0).randint(3, model.config.vocab_size, (3, 9)).tolist()
        engine = Engine(model, slots=2, max_len=32, sampler=Sampler.create(0.0, None, None), page_size=4)
        out[scan] = {f.id: f.tokens for f in engine.run([Request(f"r{i}", p, 12) for i, p in enumerate(prompts)])}
    assert out[True] == out[False] and len(out[True]) == 3


def test_scanned_int8_params_and_cache_equal_unrolled(gemma3):
    load = lambda scan: gemma_jax.load(gemma3[0], dtype="float32", quant="w8a16", kv_cache="int8", scan=scan)
    unrolled, scanned = load(False), load(True)
    assert scanned.params[LAYERS]["block_0"]["mlp"]["gate"]["w"].dtype == jnp.int8
    close(scanned.logits(ROWS), unrolled.logits(ROWS))
    assert scanned.generate(PROMPTS, max_new_tokens=12) == unrolled.generate(PROMPTS, max_new_tokens=12)


def test_scanned_sharded_equals_unrolled_single_device(gemma3):
    checkpoint, unrolled = gemma3
    sharded = gemma_jax.load(checkpoint, dtype="float32", mesh=make_mesh("fsdp=2,tensor=4"), scan=True)
    gate = sharded.params[LAYERS]["block_0"]["mlp"]["gate"]["w"]  # [layers F D]: F split over tensor, layers whole
    assert {s.data.shape for s in gate.addressable_shards} == {(gate.shape[0], gate.shape[1] // 4, gate.shape[2])}
    close(sharded.logits(ROWS), unrolled.logits(ROWS))
    assert sharded.generate(PROMPTS, max_new_tokens=12) == unrolled.generate(PROMPTS, max_new_tokens=12)


def test_checkpoints_stay_per_layer(gemma3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint, unrolled = gemma3
    scanned = gemma_jax.load(checkpoint, dtype="float32", scan=True)
    # saved from the stacked tree: the same per-layer tensors, bit for bit
    save_hf("saved", scanned.config, scanned.params)
    original, saved = load_file(checkpoint / "model.safetensors"), load_file("saved/model.safetensors")
    assert sorted(saved) == sorted(original)
    for name, x in original.items():
        np.testing.assert_array_equal(saved[name], x, err_msg=name)
    # an Orbax checkpoint written per layer (by the unrolled model, as before scanning existed) loads scanned
    save_orbax(tmp_path / "orbax", params_source(unrolled.config, unrolled.params))
    close(gemma_jax.load(tmp_path / "orbax", dtype="float32", scan=True).logits(ROWS), unrolled.logits(ROWS))


def test_stack_then_unstack_is_the_identity(gemma3):
    unrolled = gemma3[1]
    family, config = family_of(unrolled.config), unrolled.config
    copy = jax.tree.map(lambda x: x, unrolled.params)
    stacked = family.stack_layers(config, copy)
    assert copy == {}  # the per-layer leaves were moved out as they were stacked
    back = family.unstack_layers(config, stacked)
    assert jax.tree.structure(back) == jax.tree.structure(unrolled.params)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), back, unrolled.params)))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_scanned_fine_tuning_equals_unrolled_and_exports_per_layer(text_checkpoint, tmp_path, lora_rank):
    """Two steps of full fine-tuning, or of LoRA (adapters stacked like the layers), with block remat on 2 devices:
    the same losses, and the exported checkpoint holds the same per-layer tensors."""
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["The quick brown fox jumps.", "Free software."] * 4))
    cfg = TrainConfig(ckpt=str(text_checkpoint[1]), data=str(corpus), out="", steps=2, seq_len=32, batch_size=4,
                      grad_accum=2, mesh="fsdp=2", remat="block", lora_rank=lora_rank, lora_targets=("q", "v", "down"),
                      learning_rate=1e-2, warmup_steps=0, export=("hf",), export_dtype="float32")  # fmt: skip
    runs = {scan: finetune(dataclasses.replace(cfg, scan=scan, out=str(tmp_path / f"scan={scan}")), devices=jax.devices()[:2],
                           progress=False) for scan in (False, True)}  # fmt: skip
    assert (LAYERS in runs[True].params) and LAYERS not in runs[False].params
    np.testing.assert_allclose(list(runs[True].losses.values()), list(runs[False].losses.values()), rtol=1e-5)
    want, got = (load_file(runs[scan].export["hf"] / "model.safetensors") for scan in (False, True))
    assert sorted(got) == sorted(want)
    for name in want:
        close(got[name], want[name])


def test_a_family_that_does_not_scan_runs_unrolled(tmp_path):
    """Gemma 3n (per-layer shapes, KV sharing) has no scanned layout: asked to scan, it runs as before."""
    make_gemma3n(**CASES["altup4-share2-sparse"]).save_pretrained(tmp_path)
    unrolled, asked = gemma_jax.load(tmp_path, dtype="float32"), gemma_jax.load(tmp_path, dtype="float32", scan=True)
    assert not asked.runtime.scan and LAYERS not in asked.params
    np.testing.assert_array_equal(asked.logits(ROWS), unrolled.logits(ROWS))


def test_generate_command_with_scan_prints_the_same_text(text_checkpoint, capsys):
    from gemma_jax.cli import main

    args = ["generate", "--ckpt", str(text_checkpoint[1]), "--prompt", "The licence", "--max-new-tokens", "6", "--no-compile-cache"]
    main(args)
    unrolled = capsys.readouterr().out
    main([*args, "--scan"])
    assert capsys.readouterr().out == unrolled and unrolled.strip()


def test_scanned_classifier_scores_equal_unrolled(tmp_path):
    make_classifier("gemma2", SEQUENCE, num_hidden_layers=4).save_pretrained(tmp_path)
    rows = [[2, 5, 17, 33, 8], [2, 9]]
    unrolled, scanned = (gemma_jax.load(tmp_path, dtype="float32", scan=scan) for scan in (False, True))
    assert scanned.runtime.scan
    close(scanned.scores(rows), unrolled.scores(rows))
