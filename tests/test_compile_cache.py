"""The persistent compilation cache: model commands store their compiled programs under
$GEMMA_JAX_CACHE/xla and a second run reads them back; --no-compile-cache writes nothing."""

from __future__ import annotations

import os
import subprocess


def _generate(ckpt, cache, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GEMMA_JAX_CACHE": str(cache)}
    command = ["gemma-jax", "generate", "--ckpt", str(ckpt), "--prompt", "This License", "--max-new-tokens", "4", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=True)


def test_second_run_reads_the_compiled_programs_back(text_checkpoint, tmp_path):
    ckpt = text_checkpoint[1]
    _generate(ckpt, tmp_path / "off", "--no-compile-cache")
    assert not (tmp_path / "off" / "xla").exists()
    first = _generate(ckpt, tmp_path / "on")
    entries = sorted(p.name for p in (tmp_path / "on" / "xla").iterdir())
    assert any(name.startswith("jit__prefill") for name in entries) and any(name.startswith("jit__decode") for name in entries), entries
    second = _generate(ckpt, tmp_path / "on")
    assert sorted(p.name for p in (tmp_path / "on" / "xla").iterdir()) == entries  # nothing compiled anew
    assert second.stdout == first.stdout
