"""What loaders refuse, and how: bad config values, non-finite weights, oversized tokenizers, shard
names leaving the checkpoint, undecodable files, and regexes that cannot be run in linear time.

Each error must be one line naming the file (and the field or tensor), as users see it from the CLI.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

from gemma_jax import configs
import gguf
import numpy as np
import pytest
from conftest import make_hf_model
from safetensors.numpy import load_file, save_file
from test_fuzz_loaders import _edit_gguf

from gemma_jax.checkpoint.compressed_tensors import compressed_tensors_source, save_compressed_tensors
from gemma_jax.checkpoint.gguf import write_gguf
from gemma_jax.checkpoint.hf import hf_source, load_hf, read_hf_config
from gemma_jax.checkpoint.resolve import open_checkpoint
from gemma_jax.models.gemma import GemmaConfig


@pytest.fixture
def ckpt(text_checkpoint, tmp_path, monkeypatch) -> Path:
    """A private copy of the shared tiny Gemma 2 (with its tokenizer), as a path relative to the working directory."""
    shutil.copytree(text_checkpoint[1], tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    return Path("ckpt")


def _edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


# --- item 13: config values, checked in one place (GemmaConfig) ------------------------------

BAD_VALUES = [
    ("rms_norm_eps", -1), ("head_dim", 0), ("sliding_window", 0), ("sliding_window", -1),
    ("eos_token_id", []), ("num_attention_heads", 0), ("hidden_size", 128.0), ("query_pre_attn_scalar", 0),
    ("max_position_embeddings", -1), ("num_key_value_heads", 0), ("vocab_size", True), ("bos_token_id", 10**6),
    ("rms_norm_eps", math.nan), ("final_logit_softcapping", math.inf),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_bad_config_values_name_the_file_and_field(ckpt: Path, key: str, value) -> None:
    _edit_config(ckpt, **{key: value})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(ckpt / 'config.json'))}: field '{key}' ") as e:
        read_hf_config(ckpt)
    assert "\n" not in str(e.value)


def test_zero_rope_theta_is_refused_not_defaulted(ckpt: Path) -> None:
    _edit_config(ckpt, rope_parameters={"rope_type": "default", "rope_theta": 0})
    with pytest.raises(ValueError, match=r"config.json: field 'rope_theta' must be a positive finite number, got 0$"):
        read_hf_config(ckpt)


def test_unknown_layer_type_is_named_as_such(ckpt: Path) -> None:
    _edit_config(ckpt, layer_types=["sliding_attention", "foo", "full_attention"])
    with pytest.raises(ValueError, match=r"config.json: field 'layer_types' holds 'foo'; entries are sliding_attention or"):
        read_hf_config(ckpt)


def test_missing_field_is_named(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    del config["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: field 'hidden_size' is missing"):
        read_hf_config(ckpt)


@pytest.mark.parametrize("name", configs.model_preset_names())
def test_every_preset_passes_validation_and_round_trips_through_config_json(name: str) -> None:
    config = GemmaConfig.from_preset(name)
    again = GemmaConfig.from_hf(json.loads(json.dumps(config.to_hf())))
    assert again.layer_kinds == config.layer_kinds
    assert again.replace(layer_pattern=config.layer_pattern) == config


def test_long_non_periodic_layer_types_are_read_in_linear_time() -> None:
    kinds = ["sliding_attention"] * 19_999 + ["full_attention"]  # a quadratic search: ~10^8 steps, many seconds
    hf = {**GemmaConfig.from_preset("gemma2-2b").to_hf(), "num_hidden_layers": len(kinds), "layer_types": kinds}
    start = time.perf_counter()
    assert len(GemmaConfig.from_hf(hf).layer_pattern) == len(kinds)
    assert time.perf_counter() - start < 2.0  # ~20 ms in linear time


# --- item 13: non-finite weights --------------------------------------------------------------


def test_nan_weight_is_refused_naming_the_checkpoint_and_tensor(ckpt: Path) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^ckpt: tensor layer_1/mlp/up/w \(HF model.layers.1.mlp.up_proj.weight\) holds NaN"):
        open_checkpoint(ckpt)


def test_weight_overflowing_the_requested_dtype_is_refused(ckpt: Path) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.norm.weight"][0] = 1e6  # finite in float32, inf in float16
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    load_hf(ckpt)  # as stored: fine
    with pytest.raises(ValueError, match=r"tensor final_norm/scale \(HF model.norm.weight\) holds NaN or infinite"):
        load_hf(ckpt, dtype=np.float16)


def test_infinite_weight_in_a_gguf_is_refused(ckpt: Path) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.embed_tokens.weight"][7, 1] = -np.inf
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    source = hf_source(ckpt)
    gguf_file = Path("model.gguf")
    with pytest.raises(ValueError, match="holds NaN or infinite"):  # nor is it written anywhere
        write_gguf(gguf_file, source)
    assert not gguf_file.exists()


# --- item 13: a tokenizer larger than the model's vocabulary ---------------------------------


def test_tokenizer_larger_than_the_vocabulary_is_refused_at_load(text_checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_hf_model("gemma2", vocab_size=300).save_pretrained("small")
    shutil.copy(text_checkpoint[1] / "tokenizer.model", "small/tokenizer.model")  # 512 tokens
    with pytest.raises(ValueError, match=r"^small/tokenizer.model: the tokenizer has 512 tokens, more than the model's vocab_size 300$"):
        open_checkpoint("small")


# --- item 14: shard names confined to the checkpoint ------------------------------------------


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/etc/passwd", "sub/../../x.safetensors", ""])
def test_index_shards_outside_the_checkpoint_are_refused(ckpt: Path, shard: str) -> None:
    (ckpt.parent / "other").mkdir()
    shutil.copy(ckpt / "model.safetensors", ckpt.parent / "other" / "model.safetensors")  # a real file out there
    names = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {name: shard for name in names}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"index.json: shard name {re.escape(repr(shard))} is not a file inside the checkpoint"):
        load_hf(ckpt)


def test_index_shards_in_a_subdirectory_still_load(ckpt: Path) -> None:
    (ckpt / "weights").mkdir()
    names = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").rename(ckpt / "weights" / "model.safetensors")
    index = {"metadata": {}, "weight_map": {name: "weights/model.safetensors" for name in names}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert load_hf(ckpt)[0] == read_hf_config(ckpt)


# --- item 16: decode errors name the file ------------------------------------------------------


def test_config_with_bad_utf8_names_the_file(ckpt: Path) -> None:
    text = (ckpt / "config.json").read_bytes()
    (ckpt / "config.json").write_bytes(text.replace(b'"gemma2"', b'"gemma\xff"'))
    with pytest.raises(ValueError, match=r"^ckpt/config.json is not valid UTF-8 text"):
        open_checkpoint(ckpt)


def test_config_with_bad_json_names_the_file(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{"model_type": "gemma2",')
    with pytest.raises(ValueError, match=r"^ckpt/config.json is not valid JSON"):
        open_checkpoint(ckpt)


def test_bad_tokenizer_is_refused_before_the_weights_naming_the_file(ckpt: Path, monkeypatch) -> None:
    (ckpt / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff\xff not protobuf")
    monkeypatch.setattr("gemma_jax.checkpoint.hf.read_tensor", lambda *a: pytest.fail("read weights first"))
    with pytest.raises(ValueError, match=r"^ckpt/tokenizer.model: not a valid sentencepiece model"):
        open_checkpoint(ckpt)


# --- item 9: compressed-tensors ignore patterns (the backtracking one: test_fuzz_loaders.py) ---


@pytest.fixture
def w8a8(ckpt: Path) -> Path:
    return save_compressed_tensors(Path("w8a8"), hf_source(ckpt))


def _set_ignore(path: Path, ignore: list[str]) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["ignore"] = ignore
    (path / "config.json").write_text(json.dumps(config))


def test_ignore_pattern_that_needs_backtracking_is_refused_naming_the_file(w8a8: Path) -> None:
    _set_ignore(w8a8, ["re:(?=model).*"])
    with pytest.raises(ValueError, match=r"^w8a8/config.json: ignore pattern 're:\(\?=model\)\.\*' is not a regex RE2 can run"):
        compressed_tensors_source(w8a8)


# --- GGUF: tensor data must start where GGUF aligns it -----------------------------------------


def test_misaligned_gguf_tensor_data_is_refused(ckpt: Path) -> None:
    good = write_gguf(Path("model.gguf"), hf_source(ckpt))
    stored = next(t for t in gguf.GGUFReader(good).tensors if t.name == "blk.1.attn_q.weight").field.parts[-1][0]
    bad = _edit_gguf(good, Path("shifted.gguf"), {"blk.1.attn_q.weight data offset": int(stored) + 4})
    with pytest.raises(ValueError, match=r"^shifted.gguf: the data of tensor blk.1.attn_q.weight is not aligned to 32 bytes"):
        open_checkpoint(bad)


def test_bad_gguf_metadata_value_names_the_key(ckpt: Path) -> None:
    good = write_gguf(Path("model.gguf"), hf_source(ckpt))
    bad = _edit_gguf(good, Path("heads.gguf"), {"gemma2.attention.head_count value": 0})
    with pytest.raises(ValueError, match=r"^heads.gguf: field 'gemma2.attention.head_count' must be a positive integer, got 0$"):
        open_checkpoint(bad)
