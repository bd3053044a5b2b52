"""The compile cache: model commands keep their compiled programs under $GEMMA_JAX_CACHE/xla and their
traced programs (jax.export) under $GEMMA_JAX_CACHE/programs; a second run reads both back;
--no-compile-cache writes nothing."""

from __future__ import annotations

import os
import subprocess

import pytest

import gemma_jax
from gemma_jax import compile_cache


def _generate(ckpt, cache, *extra: str, devices: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "GEMMA_JAX_CACHE": str(cache), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = ["gemma-jax", "generate", "--ckpt", str(ckpt), "--prompt", "This License", "--max-new-tokens", "12", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=True)


def _listing(cache) -> dict[str, list[str]]:
    return {kind: sorted(p.name for p in (cache / kind).iterdir()) for kind in ("xla", "programs")}


@pytest.mark.parametrize("mesh", [None, "data=2,tensor=2"])
def test_second_run_reads_the_compiled_programs_back(text_checkpoint, tmp_path, mesh):
    ckpt, extra = text_checkpoint[1], ([] if mesh is None else ["--mesh", mesh])
    _generate(ckpt, tmp_path / "off", "--no-compile-cache", *extra, devices=4)
    assert not (tmp_path / "off" / "xla").exists() and not (tmp_path / "off" / "programs").exists()
    first = _generate(ckpt, tmp_path / "on", *extra, devices=4)
    entries = _listing(tmp_path / "on")
    for kind, prefix in (("xla", "jit_"), ("programs", "")):
        assert any(name.startswith(f"{prefix}_prefill") for name in entries[kind]), entries
        assert any(name.startswith(f"{prefix}_decode") for name in entries[kind]), entries
    second = _generate(ckpt, tmp_path / "on", *extra, devices=4)
    assert _listing(tmp_path / "on") == entries  # nothing traced or compiled anew
    assert second.stdout == first.stdout


def test_kept_programs_give_the_traced_results_and_a_damaged_one_is_traced_again(text_checkpoint, tmp_path, monkeypatch):
    """In one process: generation from kept programs equals tracing; each signature is exported once; a
    kept file that cannot be read is replaced. (The suite otherwise runs with the program cache off.)"""
    model = gemma_jax.load(text_checkpoint[1], dtype="float32")
    prompts = ["The licence", "Free software is"]
    want = [c.tokens for c in model.complete(prompts, max_new_tokens=10, temperature=0.7, seed=3)]
    (tmp_path / "programs").mkdir()
    monkeypatch.setattr(compile_cache, "_programs", tmp_path / "programs")  # the XLA cache stays off
    programs = (gemma_jax.generate._prefill, gemma_jax.generate._decode)
    for damage in (False, True):
        for program in programs:
            monkeypatch.setattr(program, "calls", {})  # as a new process would start (and restored after)
        if damage:
            for path in (tmp_path / "programs").iterdir():
                path.write_bytes(b"not a program")
        got = [c.tokens for c in model.complete(prompts, max_new_tokens=10, temperature=0.7, seed=3)]
        assert got == want
        kept = sorted((tmp_path / "programs").iterdir())
        assert len(kept) == 2 and all(p.read_bytes() != b"not a program" for p in kept)
        assert [len(program.calls) for program in programs] == [1, 1]
