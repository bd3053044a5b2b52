"""Fine-tuning classifiers: a new head on a causal LM learns a synthetic task (full and LoRA), and its
export is a transformers classifier with the same logits."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess

import jax
import numpy as np
import pytest
import torch
import transformers

import gemma_jax
from gemma_jax.models.heads import SEQUENCE, TOKEN, Head
from gemma_jax.train.config import TrainConfig
from gemma_jax.train.metrics import read_metrics
from gemma_jax.train.run import finetune

FILLER = "the of software you and to program license work any copy may that this".split()
CUES = {"good": "freedom", "bad": "warranty"}  # the label is which cue word the sentence holds, anywhere in it


def _sentences(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        label = rng.choice(sorted(CUES))
        words = rng.sample(FILLER, rng.randint(3, 7))
        words.insert(rng.randint(0, len(words)), CUES[label])
        lines.append({"text": " ".join(words), "label": label})
    return lines


def _tagged(n: int, seed: int) -> list[dict]:
    """Token classification: a word is CUE if it is one of the cue words, else O."""
    return [{"tokens": r["text"].split(), "labels": ["CUE" if w in CUES.values() else "O" for w in r["text"].split()]}
            for r in _sentences(n, seed)]  # fmt: skip


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls-data")
    return {
        SEQUENCE: (_write(root / "seq-train.jsonl", _sentences(256, 0)), _write(root / "seq-eval.jsonl", _sentences(64, 1))),
        TOKEN: (_write(root / "tok-train.jsonl", _tagged(128, 2)), _write(root / "tok-eval.jsonl", _tagged(32, 3))),
    }


def _cfg(ckpt, task, data, out, **changes) -> TrainConfig:
    train, held_out = data[task]
    settings = dict(ckpt=str(ckpt), data=train, eval_data=held_out, out=str(out), task=task, steps=60, seq_len=32,
                    batch_size=16, learning_rate=3e-3, warmup_steps=4, save_every=30, eval_every=30, export=("hf",),
                    export_dtype="float32", mesh="fsdp=1")  # fmt: skip
    return TrainConfig(**{**settings, **changes})


def _transformers_logits(path, rows: list[list[int]], task: str) -> np.ndarray:
    auto = transformers.AutoModelForSequenceClassification if task == SEQUENCE else transformers.AutoModelForTokenClassification
    model = auto.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.numpy()


@pytest.mark.parametrize("task, lora_rank", [(SEQUENCE, 0), (SEQUENCE, 4), (TOKEN, 0)], ids=["seq-full", "seq-lora", "tok-full"])
def test_new_head_learns_and_exports_to_transformers(text_checkpoint, data, tmp_path, task, lora_rank):
    cfg = _cfg(text_checkpoint[1], task, data, tmp_path / "run", lora_rank=lora_rank,
               learning_rate=3e-3 if lora_rank == 0 else 1e-2)  # fmt: skip
    result = finetune(cfg, devices=jax.devices()[:1], progress=False)
    evals = [r for r in read_metrics(cfg.out) if "eval_accuracy" in r]
    print(task, f"lora={lora_rank}", [(r["step"], round(r["eval_accuracy"], 3), round(r["eval_f1"], 3)) for r in evals])
    assert [r["step"] for r in evals] == [30, 60]
    assert evals[-1]["eval_accuracy"] >= 0.9 and evals[-1]["eval_f1"] >= 0.85  # chance: about 0.5 (seq) / the O rate (tok)

    export = result.export["hf"]
    model = gemma_jax.load(export, dtype="float32")
    labels = ("bad", "good") if task == SEQUENCE else ("CUE", "O")
    assert model.config.head == Head.classifier(task, labels)
    held_out = [json.loads(line) for line in open(data[task][1])]
    texts = [r["text"] if task == SEQUENCE else " ".join(r["tokens"]) for r in held_out[:6]]
    rows = [model.tokenizer.encode(t, add_bos=True) for t in texts]
    want = _transformers_logits(export, rows, task)
    got = model.scores(rows)
    for i, r in enumerate(rows):
        ours, theirs = (got[i], want[i]) if task == SEQUENCE else (got[i], want[i, : len(r)])
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(want).max()
    if task == SEQUENCE:  # the exported classifier classifies the held-out lines as its evaluation did
        predicted = [labels[int(np.argmax(p))] for p in model.classify([r["text"] for r in held_out])]
        accuracy = np.mean([p == r["label"] for p, r in zip(predicted, held_out)])
        assert accuracy == pytest.approx(evals[-1]["eval_accuracy"])


def test_classifier_data_errors_name_the_line(text_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "a", "label": "x"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    command = ["gemma-jax", "finetune", "--ckpt", str(text_checkpoint[1]), "--data", "train.jsonl", "--out", "run",
               "--task", SEQUENCE, "--steps", "2", "seq_len=16", "batch_size=2"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("gemma-jax finetune: error: train.jsonl:2: expected {\"text\"")


def test_an_existing_classifier_keeps_its_head_and_a_lora_run_resumes(text_checkpoint, data, tmp_path):
    """From a transformers classifier (its labels, its score), LoRA: the head's state is checkpointed and
    restored with the adapters; a label the head lacks is refused naming the line."""
    import shutil

    from test_heads import make_classifier

    ckpt = tmp_path / "clf"
    make_classifier("gemma2", SEQUENCE, labels=("bad", "good", "other"), vocab_size=text_checkpoint[0].config.vocab_size,
                    seed=3).save_pretrained(ckpt)  # fmt: skip
    shutil.copy(text_checkpoint[1] / "tokenizer.model", ckpt)
    cfg = _cfg(ckpt, None, {None: data[SEQUENCE]}, tmp_path / "run", lora_rank=4, steps=10, save_every=5, eval_every=10)
    first = finetune(cfg, devices=jax.devices()[:1], progress=False)
    assert first.step == 10 and set(first.params) >= {"score", "layer_0"}
    longer = dataclasses.replace(cfg, steps=14)
    resumed = finetune(longer, resume=True, devices=jax.devices()[:1], progress=False)
    assert sorted(resumed.losses) == [11, 12, 13, 14]
    model = gemma_jax.load(resumed.export["hf"], dtype="float32")
    assert model.config.head.labels == ("bad", "good", "other")
    assert not np.array_equal(np.asarray(model.params["score"]["w"]), np.asarray(gemma_jax.load(ckpt, dtype="float32").params["score"]["w"]))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a b", "label": "good"}) + "\n" + json.dumps({"text": "c", "label": "great"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: label 'great' is not one of the head's labels \['bad', 'good', 'other'\]"):
        finetune(dataclasses.replace(cfg, data=str(bad), out=str(tmp_path / "run2")), devices=jax.devices()[:1], progress=False)


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_sharded_head_training_equals_one_device(text_checkpoint, data, tmp_path, lora_rank):
    """The same 6 steps on fsdp=2,tensor=2 (4 devices) and on one device: equal losses and equal trained heads."""
    runs = {}
    for name, mesh, devices in (("one", "fsdp=1", 1), ("mesh", "fsdp=2,tensor=2", 4)):
        cfg = _cfg(text_checkpoint[1], SEQUENCE, data, tmp_path / name, lora_rank=lora_rank, steps=6, save_every=6,
                   eval_every=6, export=(), mesh=mesh)  # fmt: skip
        runs[name] = finetune(cfg, devices=jax.devices()[:devices], progress=False)
    one, mesh = runs["one"], runs["mesh"]
    np.testing.assert_allclose([mesh.losses[s] for s in sorted(mesh.losses)], [one.losses[s] for s in sorted(one.losses)],
                               rtol=2e-4)  # fmt: skip
    np.testing.assert_allclose(np.asarray(mesh.params["score"]["w"]), np.asarray(one.params["score"]["w"]), rtol=2e-3, atol=1e-5)
