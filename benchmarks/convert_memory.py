"""Peak memory and speed of streamed conversions of a checkpoint with Gemma 2 2B shapes.

Writes random bfloat16 tensors with the shapes of a preset (default gemma2-2b, ~5.2 GB) as a
sharded HF checkpoint (itself streamed: never all in memory), then converts HF -> Orbax and
Orbax -> HF, each in a fresh process so that its peak RSS is the conversion's alone. Prints peak
RSS and MB/s for each against the issue's target, peak RSS < largest tensor x 3 + 1 GB, checks a
few tensors survived exactly, and deletes everything unless --keep.

    python benchmarks/convert_memory.py [--dir DIR] [--preset gemma2-2b] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from gemma_jax.checkpoint import TensorSource, tensor_specs, write_hf
from gemma_jax.models.gemma import GemmaConfig

BF16 = np.dtype(ml_dtypes.bfloat16)
CHILD = """
import dataclasses, json, sys
from gemma_jax.convert import convert
summary = convert(sys.argv[1], sys.argv[2], to=sys.argv[3])
print(json.dumps(dataclasses.asdict(summary)))
"""


def random_source(config: GemmaConfig, seed: int = 0) -> TensorSource:
    """Random finite bf16 tensors (magnitudes 2^-7..2^-6, random signs and mantissas), made one at a time."""
    rng = np.random.default_rng(seed)

    def read(spec):
        bits = rng.integers(0, 2**16, size=math.prod(spec.shape), dtype=np.uint16)
        np.bitwise_and(bits, 0x807F, out=bits)  # in place: keep the sign and mantissa,
        np.bitwise_or(bits, 0x3C00, out=bits)  # set a small exponent
        return bits.view(BF16).reshape(spec.shape)

    return TensorSource(config, {s.path: BF16 for s in tensor_specs(config).values()}, read)


def run_conversion(src: Path, dst: Path, to: str) -> dict:
    """Convert in a fresh process (progress bar on stderr); its Summary as a dict."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), to], stdout=subprocess.PIPE, check=True)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="scratch directory (default: a new one in the system temp dir)")
    parser.add_argument("--preset", default="gemma2-2b")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()

    config = GemmaConfig.from_preset(args.preset)
    source = random_source(config)
    largest = max(math.prod(s.shape) for s in source.specs.values()) * BF16.itemsize
    target = 3 * largest + 1e9
    root = Path(args.dir or tempfile.mkdtemp(prefix="convert-memory-"))
    try:
        start = time.perf_counter()
        write_hf(root / "hf", source, max_shard_bytes=2 * 2**30)
        print(f"{args.preset}: {len(source.specs)} tensors, {source.nbytes / 1e9:.2f} GB bf16, largest tensor "
              f"{largest / 1e9:.2f} GB; synthesised in {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
        print(f"target: peak RSS < 3 x {largest / 1e9:.2f} + 1 = {target / 1e9:.2f} GB")
        ok = True
        for src, dst, to in [(root / "hf", root / "orbax", "orbax"), (root / "orbax", root / "hf2", "hf")]:
            s = run_conversion(src, dst, to)
            rate = s["bytes"] / s["seconds"] / 1e6
            verdict = "OK" if s["peak_rss"] < target else "OVER TARGET"
            ok &= s["peak_rss"] < target
            print(f"{src.name} -> {to}: peak RSS {s['peak_rss'] / 1e9:.2f} GB ({verdict}), {rate:.0f} MB/s, "
                  f"{s['tensors']} tensors, {s['bytes'] / 1e9:.2f} GB in {s['seconds']:.1f} s", flush=True)  # fmt: skip
        spot_check(root / "hf", root / "hf2", config)
        print("spot check: first, middle and last tensors identical after HF -> Orbax -> HF")
    finally:
        if not args.keep:
            shutil.rmtree(root)
    sys.exit(0 if ok else 1)


def spot_check(a: Path, b: Path, config: GemmaConfig) -> None:
    from gemma_jax.checkpoint.hf import locate_tensors, read_tensor

    names = list(tensor_specs(config))
    x, y = locate_tensors(a), locate_tensors(b)
    for name in (names[0], names[len(names) // 2], names[-1]):
        if read_tensor(x[name].file, name).tobytes() != read_tensor(y[name].file, name).tobytes():
            raise AssertionError(f"{name} differs after the round trip")


if __name__ == "__main__":
    main()
