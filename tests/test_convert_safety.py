"""A conversion never leaves a broken checkpoint: SIGKILL at random moments leaves no DST or the previous
one intact; corrupt inputs give a clear error and no output; every tensor is checked before it is written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gemma_jax.checkpoint import params_source, tensor_specs, write_hf
from gemma_jax.checkpoint.orbax import PARAMS_DIR, save_orbax
from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.convert import convert
from gemma_jax.checkpoint import open_source

# ~70 MB in float32: long enough (with small Orbax groups) for kills to land in every phase.
CONFIG = GemmaConfig(
    model_type="gemma2", vocab_size=4096, embed_dim=512, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=64,
    mlp_dim=2048, query_pre_attn_scalar=64, layer_pattern=("local", "global"), sliding_window=64,
    attn_logit_softcap=50.0, final_logit_softcap=30.0, use_post_norms=True,
)  # fmt: skip
CHILD = """
import sys
import gemma_jax.checkpoint.orbax as orbax
from gemma_jax.convert import convert
orbax.GROUP_BYTES = 4 << 20  # many partial saves, so kills also land between them
print("go", flush=True)
convert(sys.argv[1], sys.argv[2], to=sys.argv[3], dtype=sys.argv[4], force=True, quiet=True)
"""
KILLS = 4  # per direction


def _random_params(config: GemmaConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    params: dict = {}
    for spec in tensor_specs(config).values():
        node = params
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = rng.standard_normal(spec.shape, np.float32)
    return params


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "hf"
    write_hf(path, params_source(CONFIG, _random_params(CONFIG)), max_shard_bytes=40 << 20)
    return path


def _digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def _start(src: Path, dst: Path, to: str, dtype: str) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(dst), to, dtype], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline() == b"go\n"
    return child, time.perf_counter()


def _converted(src: Path, dst: Path, to: str, dtype: str) -> float:
    """Run a conversion to completion in a child process; its duration after start-up."""
    child, start = _start(src, dst, to, dtype)
    assert child.wait(timeout=120) == 0
    return time.perf_counter() - start


@pytest.mark.parametrize("to", ["orbax", "hf"])
def test_sigkill_at_random_moments_leaves_no_dst_or_the_previous_one(big_hf: Path, tmp_path: Path, to: str) -> None:
    """hf -> orbax into a fresh DST; orbax -> hf over an existing bfloat16 DST (--force) that a
    float32 conversion replaces. After each kill DST is absent, the previous one byte for byte,
    or the new one complete; nothing else is left but hidden temporary siblings."""
    src = big_hf
    if to == "hf":
        src = tmp_path / "src"
        convert(big_hf, src, to="orbax", quiet=True)
    dst = tmp_path / "dst"
    duration = _converted(src, tmp_path / "timing", to, "f32")  # kills land anywhere in such a run
    shutil.rmtree(tmp_path / "timing")
    if to == "hf":
        convert(src, dst, to=to, dtype="bf16", quiet=True)
    previous = _digest(dst) if dst.exists() else None
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for kill in range(KILLS):
        child, start = _start(src, dst, to, "f32")
        time.sleep(max(0.0, start + rng.uniform(0, duration) - time.perf_counter()))
        child.send_signal(signal.SIGKILL)
        child.wait()
        context = f"seed {seed}, kill {kill} at {time.perf_counter() - start:.2f}s of {duration:.2f}s"
        others = {p.name for p in tmp_path.iterdir()} - {"src", "dst"}
        assert all(n.startswith(".dst.") and n.endswith(".tmp") for n in others), (context, others)
        if previous is None and dst.exists():  # killed after the rename: the new one, complete
            _assert_complete_f32(dst, context)
            shutil.rmtree(dst)
        elif previous is not None:
            assert dst.exists(), context
            if _digest(dst) != previous:
                _assert_complete_f32(dst, context)
                previous = _digest(dst)
    assert convert(src, dst, to=to, force=True, quiet=True).tensors == len(tensor_specs(CONFIG))


def _assert_complete_f32(path: Path, context: str) -> None:
    source = open_source(path)
    assert set(source.dtypes.values()) == {np.dtype(np.float32)}, context
    assert sum(1 for _ in source) == len(tensor_specs(CONFIG)), context


# --- corrupt inputs ---------------------------------------------------------------------------


def _truncate(hf: Path) -> str:
    shard = sorted(hf.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    return "not a readable safetensors file.*incomplete metadata"


def _lie_about_sizes(hf: Path) -> str:
    shard = sorted(hf.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] // 2, *header[name]["shape"][1:]]  # fewer bytes than its offsets
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])
    return "not a readable safetensors file.*invalid shape, data type, or offset"


def _config_disagrees(hf: Path) -> str:
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 1024}))
    return r"mlp\.down_proj\.weight in .* has shape \[512, 2048\], but config.json implies \[512, 1024\]"


@pytest.mark.parametrize("damage", [_truncate, _lie_about_sizes, _config_disagrees])
def test_corrupt_hf_input_gives_a_clear_error_and_no_output(big_hf: Path, tmp_path: Path, damage) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in big_hf.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    message = damage(src)
    with pytest.raises(ValueError, match=message):
        convert(src, tmp_path / "dst", to="orbax", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_orbax_data_lost_mid_conversion_gives_a_clear_error_and_no_output(big_hf: Path, tmp_path: Path) -> None:
    """Damage only found while streaming (after writing began) still leaves nothing behind."""
    convert(big_hf, tmp_path / "src", to="orbax", quiet=True)
    data = sorted((tmp_path / "src" / PARAMS_DIR).rglob("d/*"), key=lambda p: p.stat().st_size)
    data[-1].write_bytes(b"")  # the largest data file, holding the tensors streamed last
    with pytest.raises(ValueError, match="cannot read"):
        convert(tmp_path / "src", tmp_path / "dst", to="hf", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("writer", ["hf", "orbax"])
def test_every_tensor_is_checked_against_the_config_before_it_is_written(tmp_path: Path, writer: str) -> None:
    small = CONFIG.replace(vocab_size=64, num_layers=2)
    source = params_source(small, _random_params(small))
    lying = dataclasses.replace(source, read=lambda s: source.read(s)[..., :1] if s.path[-1] == "w" else source.read(s))
    with pytest.raises(ValueError, match=r"layer_0/attn/q/w \(HF .*q_proj.weight\) was read as float32 \[8, 64, 1\], "
                                         r"but the config implies float32 \[8, 64, 512\]"):  # fmt: skip
        (write_hf if writer == "hf" else save_orbax)(tmp_path / "dst", lying)
    assert list(tmp_path.iterdir()) == []
