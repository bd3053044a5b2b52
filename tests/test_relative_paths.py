"""Every path a user types works relative to the current directory: Orbax itself needs absolute ones.

Run from a temporary working directory, as users do: convert on the command line, load,
quantize, and a fine-tuning run whose checkpoints and exports go under a relative --out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import gemma_jax
from gemma_jax.quantize import quantize_checkpoint
from gemma_jax.train.config import TrainConfig
from gemma_jax.train.run import finetune

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}


def test_convert_load_and_quantize_with_relative_paths(text_checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    command = [sys.executable, "-m", "gemma_jax.cli", "convert", str(text_checkpoint[1]), "g-orbax", "--to", "orbax", "--quiet"]
    convert = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr
    quantize_checkpoint("g-orbax", "q-w8a16", scheme="w8a16", quiet=True)
    want = gemma_jax.load(text_checkpoint[1], dtype="float32").logits([[2, 5, 7]])
    assert np.array_equal(gemma_jax.load("g-orbax", dtype="float32").logits([[2, 5, 7]]), want)
    quantized = gemma_jax.load("q-w8a16").logits([[2, 5, 7]])
    assert np.abs(quantized - want).max() < 0.05 * np.abs(want).max()


def test_finetune_checkpoints_export_and_resume_under_a_relative_out(text_checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("train.jsonl").write_text("".join(json.dumps({"text": f"Seven purple whales, number {i}."}) + "\n" for i in range(8)))
    cfg = TrainConfig(
        ckpt=str(text_checkpoint[1]), data="train.jsonl", out="runs/exp1", steps=2, seq_len=32, batch_size=2,
        warmup_steps=1, save_every=1, eval_every=0, export=("orbax",), export_dtype="float32", mesh="fsdp=1",
    )  # fmt: skip
    done = finetune(cfg, devices=jax.devices()[:1], progress=False)
    assert done.step == 2 and done.export["orbax"] == Path("runs/exp1/export/orbax")
    again = finetune(cfg, resume=True, devices=jax.devices()[:1], progress=False)  # restores step 2, exports again
    assert again.step == 2 and again.export == done.export
    assert gemma_jax.load("runs/exp1/export/orbax").config == gemma_jax.load(text_checkpoint[1]).config
