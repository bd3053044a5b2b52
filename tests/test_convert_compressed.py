"""compressed-tensors W8A8 int8 checkpoints: import (dequantized) and export, checked against the
compressed-tensors library itself through transformers' loader (`dequantize=True`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import make_hf_model
from safetensors.numpy import save_file
from test_convert import assert_same_bits, hf_tensors

from gemma_jax.api import Gemma
from gemma_jax.checkpoint.compressed_tensors import load_compressed_tensors
from gemma_jax.convert import convert
from gemma_jax.checkpoint import detect_format

compressed_tensors = pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")  # our dequantize=True

# The quantization_config of RedHatAI/gemma-2-2b-it-quantized.w8a8, as llm-compressor writes it.
W8A8 = {
    "config_groups": {"group_0": {
        "input_activations": {"actorder": None, "block_structure": None, "dynamic": True, "group_size": None,
                              "num_bits": 8, "observer": None, "observer_kwargs": {}, "strategy": "token",
                              "symmetric": True, "type": "int"},
        "output_activations": None,
        "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
                    "observer": "mse", "observer_kwargs": {}, "strategy": "channel", "symmetric": True, "type": "int"},
    }},
    "format": "int-quantized", "global_compression_ratio": 1.46, "ignore": ["lm_head"], "kv_cache_scheme": None,
    "quant_method": "compressed-tensors", "quantization_status": "compressed",
}  # fmt: skip
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _w8a8_checkpoint(path: Path, ignore: list[str], ignored_layer: int | None) -> transformers.PreTrainedModel:
    """A W8A8 checkpoint of a random tiny Gemma 2, quantized here with compressed-tensors' formula
    (bf16 scale = absmax / 127.5 per output row; q = clamp(round(w / scale), -128, 127))."""
    model = make_hf_model("gemma2").to(torch.bfloat16)
    model.save_pretrained(path)
    tensors = {}
    for name, t in model.state_dict().items():
        w = t.float().numpy()
        module = name.removesuffix(".weight")
        if name.endswith(tuple(f"{p}.weight" for p in PROJECTIONS)) and f"layers.{ignored_layer}." not in name:
            scale = (np.abs(w).max(axis=1, keepdims=True) / 127.5).astype(ml_dtypes.bfloat16)
            tensors[name] = np.clip(np.round(w / scale.astype(np.float32)), -128, 127).astype(np.int8)
            tensors[module + ".weight_scale"] = scale
        elif name != "lm_head.weight":
            tensors[name] = w.astype(ml_dtypes.bfloat16)
    (path / "model.safetensors").unlink()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": {**W8A8, "ignore": ignore}}))
    return model


def _dequantized_by_transformers(path: Path) -> dict[str, np.ndarray]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
    )
    return {k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16) for k, v in model.state_dict().items() if k != "lm_head.weight"}


@pytest.mark.parametrize(("ignore", "ignored_layer"), [(["lm_head"], None), (["lm_head", r"re:.*layers\.1\."], 1)])
def test_import_dequantizes_as_compressed_tensors_does(tmp_path: Path, ignore: list[str], ignored_layer: int | None) -> None:
    src = tmp_path / "w8a8"
    _w8a8_checkpoint(src, ignore, ignored_layer)
    assert detect_format(src) == "compressed-tensors"
    convert(src, tmp_path / "hf", to="hf", quiet=True)
    assert_same_bits(hf_tensors(tmp_path / "hf"), _dequantized_by_transformers(src))

    config, params, _ = load_compressed_tensors(src)  # bf16, the scales' dtype, as compressed-tensors returns
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    tokens = np.random.RandomState(0).randint(3, config.vocab_size, (2, 20))
    with torch.no_grad():
        want = reference(torch.tensor(tokens)).logits.numpy()
    assert np.abs(Gemma(config, params).logits(tokens) - want).max() <= 1e-4 * np.abs(want).max()


def test_export_is_read_back_by_compressed_tensors_within_half_a_step(hf_checkpoint, tmp_path: Path) -> None:
    _, src = hf_checkpoint("gemma2")
    convert(src, tmp_path / "w8a8", to="compressed-tensors", dtype="bf16", quiet=True)
    stored = hf_tensors(tmp_path / "w8a8")
    config = json.loads((tmp_path / "w8a8" / "config.json").read_text())
    compressed_tensors.QuantizationConfig.model_validate(config["quantization_config"])  # the library's own schema
    original = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in hf_tensors(src).items()}  # as quantized
    for name, w in original.items():
        module = name.removesuffix(".weight")
        if module.endswith(PROJECTIONS):
            assert stored[name].dtype == np.int8 and stored[module + ".weight_scale"].shape == (w.shape[0], 1)
        else:
            assert stored[name].dtype == ml_dtypes.bfloat16

    theirs = _dequantized_by_transformers(tmp_path / "w8a8")
    convert(tmp_path / "w8a8", tmp_path / "back", to="hf", quiet=True)
    assert_same_bits(hf_tensors(tmp_path / "back"), theirs)  # our import agrees with compressed-tensors'
    for name, w in original.items():
        module = name.removesuffix(".weight")
        got = theirs[name].astype(np.float32)
        if module.endswith(PROJECTIONS):
            step = stored[module + ".weight_scale"].astype(np.float32)
            assert np.all(np.abs(got - w) <= step / 2 + np.abs(got) * 2**-8), name  # half a step, then bf16 rounding
        else:
            np.testing.assert_array_equal(got, w)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda q: q.update(format="pack-quantized"), "format 'pack-quantized' is not supported"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False), "only W8A8 int8 with symmetric"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor"), "only W8A8 int8 with symmetric"),
        (lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False), "static activation"),
        (lambda q: q.update(ignore=["lm_head", "model.layers.0.mlp.up_proj"]), "unexpected tensors model.layers.0.mlp.up_proj.weight_scale"),
    ],
)
def test_unsupported_or_inconsistent_checkpoints_are_refused(tmp_path: Path, edit, message: str) -> None:
    src = tmp_path / "w8a8"
    _w8a8_checkpoint(src, ["lm_head"], None)
    config = json.loads((src / "config.json").read_text())
    quant = copy.deepcopy(config["quantization_config"])
    edit(quant)
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    with pytest.raises(ValueError, match=message):
        convert(src, tmp_path / "out", to="orbax", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w8a8"]
