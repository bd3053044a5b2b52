"""Hugging Face repo ids as `--ckpt`: resolved through huggingface_hub's cache, offline here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gemma_jax.checkpoint.resolve import checkpoint_path

REPO = "testorg/tiny-gemma"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, text_checkpoint, monkeypatch):
    """HF_HOME holding `REPO` laid out as huggingface_hub caches it; offline; cwd = tmp_path/work."""
    repo = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(text_checkpoint[1], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def _cli(env, *args):
    return subprocess.run(["gemma-jax", *args], capture_output=True, text=True, timeout=300, env=env)


def test_repo_id_loads_from_the_offline_hub_cache(hub_cache):
    done = _cli(hub_cache, "generate", "--ckpt", REPO, "--prompt", "This License", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    assert "4 new tokens" in done.stderr


def test_missing_repo_offline_is_a_one_line_error(hub_cache):
    done = _cli(hub_cache, "generate", "--ckpt", "testorg/missing", "--prompt", "x")
    assert done.returncode == 1
    assert done.stderr.startswith("gemma-jax generate: error: testorg/missing is not a local path")
    assert "HF_HUB_OFFLINE=1" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_existing_local_path_wins_over_a_repo_id(hub_cache, text_checkpoint):
    local = Path(REPO)
    shutil.copytree(text_checkpoint[1], local)
    assert checkpoint_path(REPO) == local


def test_paths_that_are_not_repo_ids_are_left_alone(hub_cache):
    for path in ("./org/name", "a/b/c", "../x/y", "model.gguf"):
        assert checkpoint_path(path) == Path(path)
