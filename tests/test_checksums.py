"""Our checkpoints carry per-tensor checksums: damage is an error naming the checkpoint and the tensor,
`gemma-jax verify` reports it in one line, and `--no-verify` / `verify=False` loads anyway."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_jax
from gemma_jax.checkpoint.manifest import MANIFEST_FILE, checksum
from gemma_jax.checkpoint.orbax import CONFIG_FILE, PARAMS_DIR, load_orbax
from gemma_jax.convert import convert
from gemma_jax.train.checkpoint import Checkpoints
from gemma_jax.verify import verify

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
IDS = [[2, 5, 7, 11]]


@pytest.fixture(scope="module")
def orbax_ckpt(text_checkpoint, tmp_path_factory) -> Path:
    """A float32 Orbax checkpoint of ours, with a tokenizer."""
    path = tmp_path_factory.mktemp("orbax") / "g-orbax"
    convert(text_checkpoint[1], path, to="orbax", quiet=True)
    return path


def _flip_bytes(ckpt: Path, n: int, seed: int = 0) -> None:
    """Flip one bit in each of `n` random bytes of the checkpoint's largest data file (the tensors)."""
    data = max((ckpt / PARAMS_DIR).rglob("d/*"), key=lambda p: p.stat().st_size)
    blob, rng = bytearray(data.read_bytes()), random.Random(seed)
    for i in rng.sample(range(len(blob) // 4, len(blob)), n):  # past the file's start: tensor data, not headers
        blob[i] ^= 0x04
    data.write_bytes(bytes(blob))


def test_flipped_bytes_fail_the_load_naming_checkpoint_and_tensor(orbax_ckpt, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(orbax_ckpt, "damaged")
    _flip_bytes(Path("damaged"), 8)
    with pytest.raises(ValueError, match=r"^damaged: checkpoint is damaged: tensor \S+ does not match its checksum"):
        gemma_jax.load("damaged")
    with pytest.raises(ValueError, match=r"tensor \S+ does not match its checksum"):
        convert("damaged", "out", to="hf", quiet=True)  # streaming reads check each tensor too
    assert not Path("out").exists()
    loaded = gemma_jax.load("damaged", dtype="float32", verify=False)  # the user's call
    assert not np.array_equal(loaded.logits(IDS), gemma_jax.load(orbax_ckpt, dtype="float32").logits(IDS))

    command = [sys.executable, "-m", "gemma_jax.cli", "verify", "damaged"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("gemma-jax verify: error: damaged: checkpoint is damaged: ") and "do not match their checksums: " in line
    assert verify(orbax_ckpt).endswith(": OK, 35 tensors (0.2 MB) and 2 files match their checksums")


def test_changed_config_or_tokenizer_is_damage_too(orbax_ckpt, tmp_path) -> None:
    for name in (CONFIG_FILE, "tokenizer.model"):
        copy = shutil.copytree(orbax_ckpt, tmp_path / name)
        file = copy / name
        file.write_bytes(file.read_bytes().replace(b"30.0", b"31.0") if name == CONFIG_FILE else file.read_bytes()[:-1])
        with pytest.raises(ValueError, match=rf"checkpoint is damaged: {name} is missing or does not match its checksum"):
            load_orbax(copy)


def test_checkpoints_without_a_manifest_still_load(orbax_ckpt, tmp_path) -> None:
    old = shutil.copytree(orbax_ckpt, tmp_path / "old")
    (old / MANIFEST_FILE).unlink()
    assert np.array_equal(gemma_jax.load(old, dtype="float32").logits(IDS), gemma_jax.load(orbax_ckpt, dtype="float32").logits(IDS))
    assert "structure OK; no checksums.json" in verify(old)


def test_checks_hold_across_dtypes_and_meshes(orbax_ckpt, tmp_path) -> None:
    """float32 stored, bfloat16 loaded (checked as stored, then cast); bfloat16 stored, float32 loaded
    (checked by casting back); restored onto a 2-device mesh (checked shard by shard)."""
    want = load_orbax(orbax_ckpt, dtype=jnp.bfloat16, verify=False)[1]
    got = load_orbax(orbax_ckpt, dtype=jnp.bfloat16)[1]
    assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), got, want))
    convert(orbax_ckpt, tmp_path / "bf16", to="orbax", dtype="bf16", quiet=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    split = lambda _p, shape: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*(["x"] if shape[0] % 2 == 0 else [])))
    params = load_orbax(tmp_path / "bf16", dtype=jnp.float32, sharding=split)[1]
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}


def test_checksum_sees_any_changed_or_moved_word_and_not_the_split() -> None:
    x = np.random.default_rng(0).standard_normal((6, 10), np.float32)
    flipped, swapped = x.copy(), x.copy()
    flipped.reshape(-1).view(np.uint8)[17] ^= 1
    swapped[[1, 2]] = swapped[[2, 1]]
    sums = {checksum(x), checksum(flipped), checksum(swapped), checksum(x.T.copy())}
    assert len(sums) == 4
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
    assert checksum(sharded) == checksum(x)
    bf16 = jnp.asarray(x, jnp.bfloat16)
    assert checksum(bf16.astype(jnp.float32), "bfloat16") == checksum(bf16)


def test_damaged_training_checkpoint_fails_the_resume(tmp_path) -> None:
    w = np.random.default_rng(0).integers(-(2**31), 2**31, (64, 64), np.int32)  # incompressible: stored as it is
    state = {"params": {"w": jnp.asarray(w)}, "step": jnp.int32(5)}
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=2)
    checkpoints.save(5, state, {"step": 5})
    checkpoints.wait()
    data = max((tmp_path / "checkpoints" / "5" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    restored, meta = checkpoints.restore(5, state, jax.tree.map(lambda x: x.sharding, state))
    assert meta == {"step": 5} and np.array_equal(restored["params"]["w"], state["params"]["w"])
    blob = bytearray(data.read_bytes())
    blob[blob.index(w[7, 3].tobytes())] ^= 0x01  # one bit of w[7, 3]
    data.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"checkpoints/5: checkpoint is damaged: tensor \['params'\]\['w'\] does not match"):
        checkpoints.restore(5, state, jax.tree.map(lambda x: x.sharding, state))
    checkpoints.close()
    assert json.loads((tmp_path / "checkpoints" / "5" / "checksums" / "metadata").read_text())["tensors"]
