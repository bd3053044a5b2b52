"""Conversion through our Orbax format: HF -> Orbax -> HF is bit-exact, transformers reads the result and
agrees with us, and Orbax checkpoints restore onto any mesh and dtype. Also: the converter's CLI
options, format detection and overwrite rules."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import gemma_jax
from gemma_jax.api import Gemma
from gemma_jax.checkpoint import params_source
from gemma_jax.checkpoint.hf import locate_tensors, read_tensor
from gemma_jax.checkpoint.orbax import load_orbax, read_orbax_config, save_orbax
from gemma_jax.convert import add_arguments, convert, run
from gemma_jax.checkpoint import detect_format
from gemma_jax.models.gemma import FAMILY
logical_axes = FAMILY.logical_axes
from gemma_jax.sharding import RULE_SETS, Layout, make_mesh

SHARD = 30_000  # bytes: several safetensors shards even for these tiny models


def hf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a HF directory, by name, exactly as stored."""
    return {name: read_tensor(loc.file, name) for name, loc in locate_tensors(path).items()}


def assert_same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert a[name].tobytes() == b[name].tobytes(), name


def assert_logits_match(hf_dir: Path, ours: Gemma) -> None:
    """transformers' float32 logits for `hf_dir` equal ours (float32 parity tolerance of test_model.py)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    tokens = np.random.RandomState(0).randint(3, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours.logits(tokens) - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def hf_dir(request, text_checkpoint, tmp_path_factory) -> Path:
    """The shared tiny Gemma 2 (with a real tokenizer), saved sharded in `dtype`."""
    model, src = text_checkpoint
    path = tmp_path_factory.mktemp(f"hf-{request.param}") / "hf"
    model.to(getattr(torch, request.param)).save_pretrained(path, max_shard_size=SHARD)
    model.to(torch.float32)  # the session fixture is shared: leave it as found
    shutil.copy(src / "tokenizer.model", path / "tokenizer.model")
    return path


def test_hf_to_orbax_to_hf_is_bit_exact_and_transformers_agrees(hf_dir: Path, tmp_path: Path) -> None:
    orbax_dir, out = tmp_path / "orbax", tmp_path / "hf"
    first = convert(hf_dir, orbax_dir, to="orbax", quiet=True)
    assert detect_format(orbax_dir) == "orbax" and read_orbax_config(orbax_dir) == gemma_jax.checkpoint.read_hf_config(hf_dir)
    convert(orbax_dir, out, to="hf", max_shard_bytes=SHARD, quiet=True)
    assert_same_bits(hf_tensors(out), hf_tensors(hf_dir))  # every tensor, bit for bit
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert (out / "tokenizer.model").read_bytes() == (orbax_dir / "tokenizer.model").read_bytes() == (
        hf_dir / "tokenizer.model").read_bytes()  # fmt: skip
    assert first.tensors == len(hf_tensors(hf_dir)) and first.bytes == sum(x.nbytes for x in hf_tensors(hf_dir).values())

    config, params, tokenizer = load_orbax(orbax_dir, dtype="float32")
    ours = Gemma(config, params, tokenizer)
    assert_logits_match(out, ours)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer("The GNU General Public License").input_ids == tokenizer.encode("The GNU General Public License", add_bos=True)


def test_orbax_saved_from_a_2x2x2_mesh_restores_on_1x1x8_and_on_one_device(hf_dir: Path, tmp_path: Path) -> None:
    saved = gemma_jax.load(hf_dir, dtype="float32", mesh=make_mesh("data=2,fsdp=2,tensor=2"), rules="training")
    embedding = saved.params["embedder"]["embedding"]
    assert not embedding.sharding.is_fully_replicated  # really saved from shards
    save_orbax(tmp_path / "orbax", params_source(saved.config, saved.params))
    flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    want = flat(saved.params)

    layout = Layout(make_mesh("data=1,fsdp=1,tensor=8"), RULE_SETS["inference"])
    _, params, _ = load_orbax(tmp_path / "orbax", sharding=lambda p, shape: layout.sharding(logical_axes(p), shape))
    q = params["layer_0"]["attn"]["q"]["w"]
    assert q.sharding == layout.sharding(logical_axes(("layer_0", "attn", "q", "w")), q.shape)
    assert_same_bits(flat(params), want)

    _, params, _ = load_orbax(tmp_path / "orbax")
    assert {d for x in jax.tree.leaves(params) for d in x.devices()} == {jax.local_devices()[0]}
    assert_same_bits(flat(params), want)

    _, params, _ = load_orbax(tmp_path / "orbax", dtype="bfloat16")  # cast on restore
    assert_same_bits(flat(params), {k: v.astype(ml_dtypes.bfloat16) for k, v in want.items()})


def test_dtype_cast_and_gguf_round_trip(hf_dir: Path, tmp_path: Path) -> None:
    convert(hf_dir, tmp_path / "f32", to="hf", dtype="f32", quiet=True)
    want = {k: v.astype(np.float32) for k, v in hf_tensors(hf_dir).items()}
    assert_same_bits(hf_tensors(tmp_path / "f32"), want)
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["torch_dtype"] == "float32"

    convert(tmp_path / "f32", tmp_path / "model.gguf", to="gguf", quiet=True)
    assert detect_format(tmp_path / "model.gguf") == "gguf"
    convert(tmp_path / "model.gguf", tmp_path / "back", to="hf", quiet=True)
    back = hf_tensors(tmp_path / "back")
    assert sorted(back) == sorted(want)
    for name in want:  # GGUF stores norms as w + 1, so they come back within float32 rounding
        np.testing.assert_allclose(back[name], want[name], rtol=0, atol=1e-6)


def test_overwrite_needs_force_and_replaces_whole(hf_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="out already exists.*--force"):
        convert(hf_dir, dst, to="orbax", quiet=True)
    assert [p.name for p in dst.iterdir()] == ["stale.txt"]
    convert(hf_dir, dst, to="orbax", force=True, quiet=True)
    assert sorted(p.name for p in dst.iterdir()) == ["checksums.json", "gemma_config.json", "params", "tokenizer.model"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old directories left
    (tmp_path / ".out.0123456789ab.tmp").mkdir()  # as a killed conversion leaves it: nobody holds its lock
    convert(hf_dir, dst, to="hf", force=True, quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the leftover was removed
    with pytest.raises(ValueError, match="overlap"):
        convert(hf_dir, hf_dir / "inside", to="hf", quiet=True)


def test_cli_options_and_summary_line(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    run(parser.parse_args([str(hf_dir), str(tmp_path / "orbax"), "--to", "orbax", "--dtype", "f32"]))
    err = capsys.readouterr().err
    n = len(hf_tensors(hf_dir))
    assert f"converted {n} tensors" in err and "MB/s" in err and "peak RSS" in err, err
    assert {x.dtype for x in jax.tree.leaves(load_orbax(tmp_path / "orbax")[1])} == {np.dtype(np.float32)}
    with pytest.raises(SystemExit):
        parser.parse_args([str(hf_dir), str(tmp_path / "x"), "--to", "safetensors"])


def test_detect_format_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a GGUF file"):
        detect_format(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(tmp_path)


def test_checkpoint_of_the_old_weight_layout_is_refused_with_a_hint(hf_dir: Path, tmp_path: Path) -> None:
    """Version 1 of our format stored weights [in, out]; reading one must say so rather than fail on shapes."""
    orbax_dir = tmp_path / "orbax"
    convert(hf_dir, orbax_dir, to="orbax", quiet=True)
    meta_file = orbax_dir / "gemma_config.json"
    meta = json.loads(meta_file.read_text())
    assert meta["version"] == 2
    meta_file.write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(ValueError, match="version 1 stored weights \\[in, out\\]: convert the original checkpoint again"):
        gemma_jax.load(orbax_dir)
