"""Two cooperating processes (2 x 4 CPU devices, gloo) started by launch/local.sh generate
exactly what one process generates."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gemma_jax.tiny import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cache"))


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "1", "--top-p", "0.9", "--seed", "5"]])
def test_two_processes_generate_what_one_process_generates(ckpt, sampling):
    args = ["gemma-jax", "generate", "--ckpt", str(ckpt), "--prompt", "This License", "--max-new-tokens", "16",
            "--dtype", "float32", *sampling]  # fmt: skip
    single = _run(args)
    multi = _run(["bash", "launch/local.sh", "2", "4", "--", *args, "--mesh", "data=2,tensor=4"])
    multi = "".join(line for line in multi.splitlines(keepends=True) if not line.startswith("[Gloo]"))  # gloo's own log
    assert single.strip() and multi == single
