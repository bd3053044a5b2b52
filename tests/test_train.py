"""Fine-tuning end to end: memorisation, exact resume after SIGTERM and kill -9, sharded == single
device, LoRA with a frozen base and a merged export that `transformers` reads.

Runs share their settings (and so their compiled steps, cached per StepSpec) where they can.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

import gemma_jax
from gemma_jax.checkpoint.orbax import load_orbax
from gemma_jax.models.gemma.model import Transformer
from gemma_jax.quant import quantize_params
from gemma_jax.train.config import TrainConfig
from gemma_jax.train import lora as lora_lib
from gemma_jax.train.checkpoint import Checkpoints
from gemma_jax.train.data import Batches, load_rows
from gemma_jax.train.metrics import read_metrics
from gemma_jax.train.run import finetune
from gemma_jax.train.step import StepSpec, compiled
from gemma_jax.sharding import RULE_SETS, Layout, make_mesh, place

DOCS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Free software means users have the freedom to run, copy and change it.",
    "Seven purple whales sang softly under the frozen northern moon.",
]
CHAT = [{"role": "user", "content": "What is the capital of Gemmaland?"}, {"role": "assistant", "content": "Jaxville, by the sea."}]
STEPS = 80


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*({"text": d} for d in DOCS), {"messages": CHAT}]))
    return path


@pytest.fixture(scope="module")
def full_cfg(text_checkpoint, corpus, tmp_path_factory) -> TrainConfig:
    """Full fine-tuning on one device: 8 rows of 96 tokens (2 documents each) per step, in 2 micro-batches."""
    return TrainConfig(
        ckpt=str(text_checkpoint[1]), data=str(corpus), eval_data=str(corpus), out=str(tmp_path_factory.mktemp("full")),
        steps=STEPS, seq_len=96, batch_size=8, grad_accum=2, learning_rate=1e-2, warmup_steps=5, save_every=5,
        eval_every=20, export=("hf",), export_dtype="float32", mesh="fsdp=1",
    )  # fmt: skip


@pytest.fixture(scope="module")
def full_run(full_cfg):
    return finetune(full_cfg, devices=jax.devices()[:1], progress=False)


def test_loss_falls_and_the_corpus_is_memorised(full_cfg, full_run):
    losses = full_run.losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < 0.05 * losses[1], (losses[1], losses[STEPS])
    records = read_metrics(full_cfg.out)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40, 60, 80] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_ppl"] == pytest.approx(np.exp(evals[-1]["eval_loss"]))
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in records if "loss" in r)
    model = gemma_jax.load(full_run.export["hf"], dtype="float32")
    tok = model.tokenizer
    docs = [tok.encode(doc, add_bos=True) for doc in DOCS]
    prompts = [ids[:6] for ids in docs] + [tok.encode_chat(CHAT[:1])]  # one batch: one compilation
    *continued, reply = model.generate(prompts, max_new_tokens=48)
    assert continued == [ids[6:] for ids in docs]  # each document to its end, then eos
    assert tok.decode(reply) == CHAT[1]["content"]  # the model turn, then <end_of_turn>


def _launch(cfg: TrainConfig, cache: Path, resume: bool) -> subprocess.Popen:
    """`python -m gemma_jax.train --config RUN.yaml` on one CPU device, sharing a compilation cache."""
    settings = Path(cfg.out).with_suffix(".yaml")
    settings.write_text(cfg.to_yaml())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}  # fmt: skip
    command = [sys.executable, "-m", "gemma_jax.train", "--config", str(settings), "--no-progress"] + ["--resume"] * resume
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _signal_at(process: subprocess.Popen, metrics: Path, step: int, signum: int) -> None:
    """Send `signum` once metrics.jsonl reports `step` (the run is then mid-way, checkpoints behind it)."""
    while process.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(line).get("step", 0) >= step for line in lines if line.endswith("}")):
            process.send_signal(signum)
            return
        time.sleep(0.005)
    pytest.fail(f"the run ended before step {step}:\n{process.stdout.read()}")


def test_resume_after_sigterm_and_kill_9_repeats_the_uninterrupted_losses(full_cfg, full_run, tmp_path):
    cfg = dataclasses.replace(full_cfg, out=str(tmp_path / "run"))
    metrics, cache = tmp_path / "run" / "metrics.jsonl", tmp_path / "jax-cache"

    first = _launch(cfg, cache, resume=False)
    _signal_at(first, metrics, 12, signal.SIGTERM)  # preemption: finish the step, save, exit 0
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 0 and "preempted (SIGTERM): checkpoint saved at step" in out, out
    stopped = int(out.split("at step ")[1].split("/")[0])
    assert 12 <= stopped < STEPS and Checkpoints(tmp_path / "run" / "checkpoints", 3).latest() == stopped

    second = _launch(cfg, cache, resume=True)
    _signal_at(second, metrics, stopped + 15, signal.SIGKILL)  # no chance to save: back to the last checkpoint
    second.wait(timeout=120)
    assert not (tmp_path / "run" / "export").exists()

    third = _launch(cfg, cache, resume=True)
    out = third.communicate(timeout=300)[0]
    assert third.returncode == 0 and f"done at step {STEPS}/{STEPS}" in out, out
    resumed = {r["step"]: r["loss"] for r in read_metrics(cfg.out) if "loss" in r}
    assert sorted(resumed) == list(range(1, STEPS + 1))  # records of steps lost to kill -9 were replaced
    steps = range(1, STEPS + 1)
    np.testing.assert_allclose([resumed[s] for s in steps], [full_run.losses[s] for s in steps], rtol=1e-6)


def _step_once(cfg: TrainConfig, mesh: str, devices: int):
    """(params, loss) after the first step of `cfg` on a mesh over the first `devices` devices."""
    model = gemma_jax.load(cfg.ckpt, dtype="float32")
    layout = Layout(make_mesh(mesh, devices=jax.devices()[:devices]), RULE_SETS["training"])
    fns = compiled(StepSpec.create(cfg, model.config, layout))
    rows = Batches(load_rows(cfg.data, model.tokenizer, cfg.seq_len), cfg.batch_size, seed=jax.random.PRNGKey(cfg.seed).tolist())(0)
    batch = {k: place(v.reshape(cfg.grad_accum, cfg.micro_batch, cfg.seq_len), fns.batch[k]) for k, v in rows.items()}
    state, metrics = fns.train(fns.fresh_state(jax.device_put(model.params, fns.state["params"]), cfg.seed), {}, batch)
    return state["params"], float(metrics["loss"])


@pytest.mark.parametrize("mesh,grad_accum", [("data=2,fsdp=2,tensor=2", 2), ("data=1,fsdp=8,tensor=1", 1)])
def test_sharded_step_equals_single_device(full_cfg, mesh, grad_accum):
    """Also: one batch of 8 rows gives the same step as 2 accumulated micro-batches of 4."""
    want_params, want_loss = _step_once(full_cfg, "fsdp=1", 1)
    got_params, got_loss = _step_once(dataclasses.replace(full_cfg, grad_accum=grad_accum), mesh, 8)
    q = got_params["layer_0"]["attn"]["q"]["w"]
    assert {s.data.shape for s in q.addressable_shards} != {q.shape}  # really split
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(want_params)[0], jax.tree.leaves(got_params)):
        want, got = np.asarray(want), np.asarray(got)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def lora_cfg(full_cfg, tmp_path_factory) -> TrainConfig:
    """LoRA (rank 4 on q, v, down) over 2 devices: bfloat16 activations, float32 adapters and AdamW state, block remat."""
    return dataclasses.replace(
        full_cfg, out=str(tmp_path_factory.mktemp("lora")), steps=20, eval_data=None, save_every=20, mesh="fsdp=2",
        lora_rank=4, lora_alpha=8.0, lora_targets=("q", "v", "down"), remat="block", warmup_steps=1, learning_rate=2e-2,
        export=("hf", "orbax"), compute_dtype="bfloat16",
    )  # fmt: skip


@pytest.mark.parametrize("quant", [None, "w8a16"])
def test_lora_step_trains_adapters_and_leaves_the_base_bit_identical(lora_cfg, quant):
    """Also on an int8 base (weights and scales frozen; the adapters train in float32)."""
    lora_cfg = dataclasses.replace(lora_cfg, quant=quant)
    model = gemma_jax.load(lora_cfg.ckpt, dtype="float32")
    params = model.params if quant is None else quantize_params(model.config, model.params, quant)
    base = jax.tree.map(np.asarray, params)
    layout = Layout(make_mesh(lora_cfg.mesh, devices=jax.devices()[:2]), RULE_SETS["training"])
    fns = compiled(StepSpec.create(lora_cfg, model.config, layout))
    frozen, state = jax.device_put(params, fns.frozen), fns.fresh_state(None, lora_cfg.seed)
    assert (frozen["layer_0"]["attn"]["q"]["w"].dtype == np.int8) == (quant is not None)
    assert set(state["params"]["layer_0"]["attn"]) == {"q", "v"} and set(state["params"]["layer_0"]["mlp"]) == {"down"}
    batches = Batches(load_rows(lora_cfg.data, model.tokenizer, lora_cfg.seq_len), lora_cfg.batch_size, seed=(0, 0))
    losses = []
    for step in range(5):
        batch = {k: place(v.reshape(lora_cfg.grad_accum, lora_cfg.micro_batch, -1), fns.batch[k]) for k, v in batches(step).items()}
        state, metrics = fns.train(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.9 * losses[0], losses
    assert {x.dtype for x in jax.tree.leaves((state["params"], state["opt_state"])) if x.ndim} == {np.dtype("float32")}
    assert all(np.array_equal(np.asarray(got), want) for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(base)))


def test_lora_merged_export_loads_in_transformers_with_equal_logits(lora_cfg):
    """Exported as HF (read by transformers and by us) and as our Orbax format (the same tensors)."""
    result = finetune(lora_cfg, devices=jax.devices()[:2], progress=False)
    assert result.losses[lora_cfg.steps] < 0.5 * result.losses[1]
    base = gemma_jax.load(lora_cfg.ckpt, dtype="float32")
    ids = base.tokenizer.encode(DOCS[1], add_bos=True)
    tokens = np.asarray([ids]), np.arange(len(ids))[None], np.ones((1, len(ids)), np.int32)
    adapters = {lora_lib.COLLECTION: {k: v for k, v in result.params.items() if k != "score"}}
    with lora_lib.interceptor(lora_lib.LoraSpec.create(lora_cfg)):  # as trained: unmerged
        ours = np.asarray(jax.jit(lambda p: Transformer(base.config).apply({"params": p, **adapters}, *tokens)[0])(base.params))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.export["hf"], attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    exported = gemma_jax.load(result.export["hf"], dtype="float32")
    scale = np.abs(ours).max()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(exported.logits([ids])[0], ours, rtol=0, atol=1e-5 * scale)
    assert np.abs(exported.logits([ids])[0] - base.logits([ids])[0]).max() > 1e-2 * scale  # the adapters changed it
    untouched = ("embedder", "embedding"), ("layer_0", "attn", "k", "w"), ("layer_1", "mlp", "up", "w")
    for path in untouched:
        got, want = exported.params, base.params
        for key in path:
            got, want = got[key], want[key]
        assert np.array_equal(np.asarray(got), np.asarray(want)), path
    _, orbax_params, orbax_tokenizer = load_orbax(result.export["orbax"])
    assert orbax_tokenizer.encode(DOCS[1], add_bos=True) == ids
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(orbax_params), jax.tree.leaves(exported.params)))


def test_short_lora_run_with_defaults_learns_and_resume_reports_the_new_schedule(text_checkpoint, tmp_path):
    """`gemma-jax finetune --lora-rank 4 --steps 10`, settings anywhere on the line, relative paths: the defaults
    (LoRA's learning rate, a warm-up scaled to the run) make the loss fall; resuming with more steps says so."""
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": DOCS[1]}) + "\n")  # one packed row: every batch is the same
    os.symlink(text_checkpoint[1], tmp_path / "ckpt")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    line = [sys.executable, "-m", "gemma_jax.cli", "finetune", "seq_len=64", "--ckpt", "ckpt", "--data", "one.jsonl",
            "batch_size=2", "--out", "run", "--lora-rank", "4", "export=[]", "--no-progress"]  # fmt: skip
    done = subprocess.run([*line, "--steps", "10"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "LoRA rank 4, 10 steps of 2 rows x 64 tokens; learning rate 0.0002 after 1 warm-up steps" in done.stderr
    assert "memory per device (estimate): params " in done.stderr
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 10 and losses[-1] < 0.98 * losses[0], losses  # on main: 17.0988 -> 17.0965
    resumed = [*line, "--resume", "--steps", "12"]
    more = subprocess.run(resumed, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr
    assert "resuming at step 10 with a different learning-rate schedule (steps 10 -> 12)" in more.stderr


def test_a_run_that_cannot_fit_is_refused_before_loading_or_compiling(full_cfg, tmp_path, monkeypatch):
    from gemma_jax.train import run

    def never(*_, **__):
        raise AssertionError("loaded or compiled")

    monkeypatch.setattr(run, "load", never)
    monkeypatch.setattr(run, "compiled", never)
    cfg = dataclasses.replace(full_cfg, out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"seq_len=512 is beyond the context of .* \(256 tokens\); set seq_len=256 or less"):
        finetune(dataclasses.replace(cfg, seq_len=512), devices=jax.devices()[:1])
    monkeypatch.setattr(run, "device_memory", lambda device: 2**30)  # as a 1 GiB accelerator reports it
    with pytest.raises(ValueError, match=r"needs about .* GiB per device, more than the 1.00 GiB of a cpu \(params .*\): lower"):
        finetune(dataclasses.replace(cfg, batch_size=4096, grad_accum=1, seq_len=256), devices=jax.devices()[:1])
    assert not (tmp_path / "run").exists()
