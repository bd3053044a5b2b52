"""`gemma-jax quantize`: int8 Orbax checkpoints, about half the bf16 size, restored sharded."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_jax
from gemma_jax.checkpoint.hf import read_hf_config
from gemma_jax.convert import convert
from gemma_jax.quant import quantize_params
from gemma_jax.quantize import quantize_checkpoint
from gemma_jax.sharding import make_mesh
from conftest import make_hf_model

TEXT = "/usr/share/common-licenses/GPL-3"
ROWS = [list(range(3, 60)), list(range(100, 157))]


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def wide_checkpoint(text_checkpoint, tmp_path_factory):
    """A Gemma 2 wide enough that arrays, not Orbax's metadata files, dominate the bytes on disk."""
    path = tmp_path_factory.mktemp("wide")
    vocab = read_hf_config(text_checkpoint[1]).vocab_size
    make_hf_model("gemma2", seed=3, vocab_size=vocab, hidden_size=256, intermediate_size=1024, head_dim=64,
                  num_hidden_layers=2).save_pretrained(path)  # fmt: skip
    shutil.copy(text_checkpoint[1] / "tokenizer.model", path)
    return path


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_quantized_checkpoint_is_half_size_and_restores_sharded(wide_checkpoint, tmp_path, scheme):
    src = wide_checkpoint
    calibration = dict(calibration=TEXT, calibration_tokens=128, ctx=64) if scheme == "w8a8" else {}
    convert(src, tmp_path / "bf16", to="orbax", dtype="bf16", quiet=True)
    quantize_checkpoint(src, tmp_path / "int8", scheme=scheme, quiet=True, **calibration)
    ratio = _disk_bytes(tmp_path / "int8") / _disk_bytes(tmp_path / "bf16")
    assert ratio <= 0.55, ratio

    single = gemma_jax.load(tmp_path / "int8", dtype="float32")
    assert single.quant == scheme and single.params["layer_1"]["mlp"]["gate"]["w"].dtype == jnp.int8
    # The same int8 tree as quantizing in memory (with the same calibration rows for SmoothQuant).
    ref = gemma_jax.load(src, dtype="bfloat16")
    rows = None
    if scheme == "w8a8":
        ids = ref.tokenizer.encode(Path(TEXT).read_text(encoding="utf-8"), add_bos=True)
        rows = np.asarray(ids[:128]).reshape(2, 64)
    in_memory = quantize_params(ref.config, ref.params, scheme, calibration=rows)
    for got, want in zip(jax.tree.leaves(single.params), jax.tree.leaves(in_memory)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    logits = single.logits(ROWS)
    float_logits = gemma_jax.load(src, dtype="float32").logits(ROWS)
    assert (logits.argmax(-1) == float_logits.argmax(-1)).mean() > 0.8

    for spec in ("data=2,fsdp=2,tensor=2", "tensor=8"):
        sharded = gemma_jax.load(tmp_path / "int8", dtype="float32", mesh=make_mesh(spec))
        gate = sharded.params["layer_1"]["mlp"]["gate"]["w"]  # [F D] int8, F split over tensor
        tensor = dict(item.split("=") for item in spec.split(","))["tensor"]
        assert gate.dtype == jnp.int8 and {s.data.shape[0] for s in gate.addressable_shards} == {1024 // int(tensor)}
        np.testing.assert_allclose(sharded.logits(ROWS), logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())


def test_quantize_refuses_bad_requests(wide_checkpoint, tmp_path):
    dst = tmp_path / "int8"
    quantize_checkpoint(wide_checkpoint, dst, scheme="w8a16", quiet=True)
    with pytest.raises(FileExistsError, match="--force"):
        quantize_checkpoint(wide_checkpoint, dst, scheme="w8a16", quiet=True)
    with pytest.raises(ValueError, match="w8a8"):
        quantize_checkpoint(wide_checkpoint, tmp_path / "x", scheme="w8a16", calibration=TEXT, quiet=True)
    with pytest.raises(ValueError, match="int8"):  # other formats need float weights
        convert(dst, tmp_path / "hf", to="hf", quiet=True)
    meta = json.loads((dst / "gemma_config.json").read_text())
    (dst / "gemma_config.json").write_text(json.dumps({**meta, "quant": "w4"}))
    with pytest.raises(ValueError, match="w4"):
        gemma_jax.load(dst)
    assert not (tmp_path / "x").exists() and not (tmp_path / "hf").exists()


def test_quantize_command_line(text_checkpoint, tmp_path):
    done = subprocess.run(["gemma-jax", "quantize", str(text_checkpoint[1]), str(tmp_path / "q"), "--scheme", "w8a16"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "quantized" in done.stderr.splitlines()[-1] and "peak RSS" in done.stderr
    out = subprocess.run(["gemma-jax", "generate", "--ckpt", str(tmp_path / "q"), "--prompt", "This License",
                          "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
