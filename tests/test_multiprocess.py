"""Two cooperating processes (2 x 4 CPU devices, gloo) started by launch/local.sh produce
exactly what one process produces. Results are compared through `infer`'s output file, which
only process 0 writes; stdout stays clean (gloo's connection lines go to stderr)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from gemma_jax.tiny import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["This License", "You may convey verbatim copies", "GNU"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cache"))


def _run(cmd: list[str], output: Path) -> dict[str, dict]:
    done = subprocess.run(cmd + ["--output", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "", done.stdout  # infer reports on stderr: nothing else may write to stdout
    return {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "1", "--top-p", "0.9", "--seed", "5"]])
def test_two_processes_generate_what_one_process_generates(ckpt, tmp_path, sampling):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    args = ["gemma-jax", "infer", "--ckpt", str(ckpt), "--input", str(tmp_path / "in.jsonl"), "--max-new-tokens", "16",
            "--batch-size", "2", "--dtype", "float32", *sampling]  # fmt: skip
    single = _run(args, tmp_path / "single.jsonl")
    multi = _run(["bash", "launch/local.sh", "2", "4", "--", *args, "--mesh", "data=2,tensor=4"], tmp_path / "multi.jsonl")
    assert len(single) == len(PROMPTS) and multi == single
    assert all(r["completion_tokens"] == 16 for r in single.values())


def test_two_processes_stream_only_the_generated_text_to_stdout(ckpt):
    """The prompt comes from process 0's stdin; stdout holds the text alone, as with one process."""
    args = ["gemma-jax", "generate", "--ckpt", str(ckpt), "--prompt", "-", "--max-new-tokens", "8", "--dtype", "float32"]
    run = lambda cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, input=PROMPTS[1])
    single, multi = run(args), run(["bash", "launch/local.sh", "2", "4", "--", *args, "--mesh", "data=2,tensor=4"])
    assert single.returncode == 0 and multi.returncode == 0, single.stderr + multi.stderr
    assert single.stdout and multi.stdout == single.stdout
