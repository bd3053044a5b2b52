"""Fuzzing our Orbax checkpoints' metadata: every damaged copy either loads with the same logits or fails
with a one-line ValueError / FileNotFoundError naming the checkpoint, quickly and in bounded memory.

The mutations hit what a reader trusts before any tensor data: our config JSON, the checksum
manifest, Orbax's JSON metadata (tree structure, checkpoint metadata) and the binary OCDBT
manifests that map tensors to data files. Seeded: a failure names its case and reproduces.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gemma_jax
from gemma_jax.convert import convert, peak_rss

SEED, CASES = 1609, 48
IDS = [[2, 5, 7, 11, 13]]
SECONDS_PER_CASE = 20.0  # generous: the machines running the suite are shared
EXTRA_MEMORY = 512 * 2**20  # over the process's peak before fuzzing


@pytest.fixture(scope="module")
def clean(hf_checkpoint, tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("fuzz") / "clean"
    convert(hf_checkpoint("gemma2")[1], path, to="orbax", quiet=True)
    return path, gemma_jax.load(path, dtype="float32").logits(IDS)


def _targets(root: Path) -> tuple[list[Path], list[Path]]:
    """(JSON metadata files, binary OCDBT manifests) of a checkpoint."""
    json_files, binary = [], []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        if file.name == "manifest.ocdbt":
            binary.append(file)
        elif file.stat().st_size < 2**20:
            try:
                json.loads(file.read_text())
                json_files.append(file)
            except (ValueError, UnicodeDecodeError):
                pass
    return json_files, binary


def _nodes(data: Any, path: tuple = ()) -> list[tuple]:
    """The paths of every value inside a JSON document."""
    found = [path]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found += _nodes(value, (*path, key))
    return found


def _mutate_json(data: Any, rng: random.Random) -> tuple[Any, str]:
    path = rng.choice(_nodes(data)[1:] or [()])
    if not path:
        return rng.choice([None, [], 0, "x"]), "replaced the document"
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    old, key = parent[path[-1]], path[-1]
    choices = {
        "deleted": None, "null": None, "huge": 2**40, "negative": -3, "string": "bogus", "empty dict": {},
        "empty list": [], "nudged": (old + 1) if isinstance(old, (int, float)) and not isinstance(old, bool) else "x",
        "bool flipped": (not old) if isinstance(old, bool) else 1.5,
    }  # fmt: skip
    how = rng.choice(sorted(choices))
    if how == "deleted":
        del parent[key]
    else:
        parent[key] = choices[how]
    return data, f"{how} at {'/'.join(map(str, path))}"


def _mutate_bytes(blob: bytes, rng: random.Random) -> tuple[bytes, str]:
    how = rng.choice(["flip", "truncate", "zero"])
    i = rng.randrange(len(blob))
    if how == "flip":
        return blob[:i] + bytes([blob[i] ^ (1 << rng.randrange(8))]) + blob[i + 1 :], f"flipped a bit of byte {i}"
    if how == "truncate":
        return blob[:i], f"truncated to {i} bytes"
    return blob[:i] + bytes(min(8, len(blob) - i)) + blob[i + 8 :], f"zeroed 8 bytes at {i}"


def test_mutated_metadata_loads_equal_or_fails_clearly(clean, tmp_path) -> None:
    source, want = clean
    rng = random.Random(SEED)
    memory_before = peak_rss()
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES):
        path = tmp_path / f"case{case}"
        shutil.copytree(source, path)
        json_files, binary = _targets(path)
        file = rng.choice(json_files + binary if case % 4 == 3 else json_files)
        if file in binary:
            blob, how = _mutate_bytes(file.read_bytes(), rng)
            file.write_bytes(blob)
        else:
            data, how = _mutate_json(json.loads(file.read_text()), rng)
            file.write_text(json.dumps(data))
        context = f"case {case} (seed {SEED}): {file.relative_to(path)}: {how}"
        start = time.perf_counter()
        try:
            got = gemma_jax.load(path, dtype="float32").logits(IDS)
        except (ValueError, FileNotFoundError) as e:
            message = str(e)
            assert "\n" not in message and str(path) in message, (context, message)
            outcomes["refused"] += 1
        else:
            np.testing.assert_array_equal(got, want, err_msg=context)
            outcomes["loaded"] += 1
        assert time.perf_counter() - start < SECONDS_PER_CASE, context
        shutil.rmtree(path)
    assert peak_rss() < memory_before + EXTRA_MEMORY
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] > 0, outcomes  # the mutations reach both outcomes


def test_unreadable_tree_metadata_says_the_checkpoint_is_damaged(clean, tmp_path) -> None:
    path = shutil.copytree(clean[0], tmp_path / "ckpt")
    metadata = path / "params" / "state" / "_METADATA"
    data = json.loads(metadata.read_text())
    del next(iter(data["tree_metadata"].values()))["key_metadata"][0]["key_type"]
    metadata.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"^{path}/params: damaged Orbax checkpoint: Orbax reads no tree from its metadata"):
        gemma_jax.load(path)


def test_damaged_tree_metadata_is_one_line_on_the_command_line(clean, tmp_path) -> None:
    """A key in Orbax's tree metadata that names no stored array: Orbax logs the tensorstore spec and,
    having closed its private event loop on the failure, its reads still in flight printed "Event loop
    is closed" tracebacks until exit. The user sees only the one-line error."""
    path = shutil.copytree(clean[0], tmp_path / "ckpt")
    metadata = path / "params" / "state" / "_METADATA"
    data = json.loads(metadata.read_text())
    key = next(k for k in data["tree_metadata"] if "'k'" in k)
    data["tree_metadata"][key]["key_metadata"][1]["key"] += "x"
    metadata.write_text(json.dumps(data))
    done = subprocess.run(["gemma-jax", "generate", "--ckpt", "ckpt", "--prompt", "hi", "--max-new-tokens", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "gemma-jax generate: error: ckpt/params: damaged Orbax checkpoint: Orbax reads no tree from its metadata (found NoneType)"
    ], done.stderr
