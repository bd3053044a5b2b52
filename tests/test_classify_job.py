"""`gemma-jax classify`: a JSONL job on infer's machinery (restartable, bad lines skipped), as users run it."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from gemma_jax.api import load
from gemma_jax.models.heads import SEQUENCE, TOKEN
from test_heads import make_classifier

TEXTS = ["GNU General Public License", "free software", "the freedom to share and change", "Preamble",
         "You may convey verbatim copies", "copyleft"]  # fmt: skip


@pytest.fixture(scope="module")
def text_classifiers(text_checkpoint, tmp_path_factory):
    """task -> directory of a tiny Gemma 2 classifier with the text checkpoint's sentencepiece tokenizer."""
    vocab = text_checkpoint[0].config.vocab_size
    made = {}
    for task in (SEQUENCE, TOKEN):
        path = tmp_path_factory.mktemp(task)
        make_classifier("gemma2", task, vocab_size=vocab).save_pretrained(path)
        shutil.copy(text_checkpoint[1] / "tokenizer.model", path)
        made[task] = path
    return made


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["gemma-jax", "classify", *args, "--dtype", "float32"], cwd=cwd, capture_output=True, text=True)


def test_classify_cli_restartable_and_tolerant(text_classifiers, tmp_path):
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(TEXTS)]
    lines[2:2] = ["{not json", json.dumps({"id": 99}), json.dumps({"id": 0, "text": "duplicate"})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    ckpt = str(text_classifiers[SEQUENCE])
    done = _run("--ckpt", ckpt, "--input", "in.jsonl", "--output", "out.jsonl", "--batch-size", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "in.jsonl:3: " in done.stderr and "in.jsonl:4: " in done.stderr and "in.jsonl:5: duplicate id '0'" in done.stderr
    assert f"{len(TEXTS)} lines classified, 0 already in out.jsonl, 3 bad lines" in done.stderr
    results = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert sorted(results) == [str(i) for i in range(len(TEXTS))]
    probs = load(ckpt, dtype="float32").classify(TEXTS)
    for i, p in enumerate(probs):
        r = results[str(i)]
        np.testing.assert_allclose([r["scores"][label] for label in ("neg", "neutral", "pos")], p, atol=1e-6)
        assert r["label"] == ("neg", "neutral", "pos")[int(np.argmax(p))]
    # a torn last line (a killed job) is cut, and only the missing ids are classified again
    text = (tmp_path / "out.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "out.jsonl").write_text("".join(text[:2]) + text[2][:10])
    again = _run("--ckpt", ckpt, "--input", "in.jsonl", "--output", "out.jsonl", cwd=tmp_path)
    assert f"{len(TEXTS) - 2} lines classified, 2 already in out.jsonl" in again.stderr, again.stderr
    resumed = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert sorted(resumed) == sorted(results)  # each id exactly once; the rerun's batches differ, so scores to rounding
    for rid, r in results.items():
        assert resumed[rid]["label"] == r["label"]
        np.testing.assert_allclose(list(resumed[rid]["scores"].values()), list(r["scores"].values()), atol=1e-6)
    strict = _run("--ckpt", ckpt, "--input", "in.jsonl", "--output", "new.jsonl", "--strict", cwd=tmp_path)
    assert strict.returncode != 0 and strict.stderr.strip().splitlines()[-1].startswith("gemma-jax classify: error: 3 bad input line(s)")


def test_token_classifier_job_labels_each_token(text_classifiers, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "text": "free software"}) + "\n")
    done = _run("--ckpt", str(text_classifiers[TOKEN]), "--input", "in.jsonl", "--output", "out.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [result] = map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())
    assert "".join(result["tokens"]) == "free software"
    assert len(result["labels"]) == len(result["scores"]) == len(result["tokens"])
    assert all(abs(sum(s.values()) - 1) < 1e-5 for s in result["scores"])


def test_causal_lm_is_refused_in_one_line(text_checkpoint, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    done = _run("--ckpt", str(text_checkpoint[1]), "--input", "in.jsonl", "--output", "out.jsonl", cwd=tmp_path)
    assert done.returncode != 0 and "gemma-jax classify: error: this checkpoint is a causal LM" in done.stderr
    assert not (tmp_path / "out.jsonl").exists()
