"""Writes into a destination: a file where a directory goes (or the reverse) is a clear error, leftovers of
killed runs are removed, and a second writer to the same destination is refused while the first runs."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_jax.checkpoint.staging import staged_dir
from gemma_jax.convert import convert

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}


def test_force_onto_the_other_kind_is_a_clear_error_leaving_both_intact(text_checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes.txt is a file, but this format is written as a directory"):
        convert(text_checkpoint[1], "notes.txt", to="orbax", force=True, quiet=True)
    Path("models").mkdir()
    Path("models/keep.txt").write_text("keep me too")
    command = [sys.executable, "-m", "gemma_jax.cli", "convert", str(text_checkpoint[1]), "models", "--to", "gguf", "--force"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("gemma-jax convert: error: models is a directory, but this format "
                                                      "is written as a file; choose another destination")  # fmt: skip
    assert Path("notes.txt").read_text() == "keep me" and Path("models/keep.txt").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "notes.txt"]  # no temporary sibling left


def test_leftovers_of_dead_writers_are_removed_live_ones_refuse_a_second_writer(hf_checkpoint, tmp_path) -> None:
    src, dst = hf_checkpoint("gemma2")[1], tmp_path / "dst"
    (tmp_path / ".dst.0123456789ab.tmp").mkdir()  # a killed run's: its lock died with it
    (tmp_path / ".dst.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"GGUF")  # an older GGUF write's
    (tmp_path / ".dst.gguf.0123456789ab.tmp").mkdir()  # another destination's (dst.gguf): not ours to judge
    convert(src, dst, to="orbax", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dst.gguf.0123456789ab.tmp", "dst"]

    live = tmp_path / ".dst.fedcba987654.tmp"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running writer holds it
    try:
        with pytest.raises(FileExistsError, match=r"dst is being written by another process \(into \.dst\.fedcba987654\.tmp\)"):
            convert(src, dst, to="hf", force=True, quiet=True)
        assert live.is_dir() and (dst / "gemma_config.json").is_file()  # neither touched
    finally:
        os.close(fd)


def test_a_writer_holds_its_destination_until_done(tmp_path) -> None:
    with staged_dir(tmp_path / "dst", overwrite=False) as tmp:
        (tmp / "a").write_text("first")
        with pytest.raises(FileExistsError, match="being written by another process"):
            with staged_dir(tmp_path / "dst", overwrite=True):
                pass
    assert (tmp_path / "dst" / "a").read_text() == "first"
    with pytest.raises(FileExistsError, match=r"dst already exists; pass --force \(overwrite=True from Python\)"):
        with staged_dir(tmp_path / "dst", overwrite=False):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]
