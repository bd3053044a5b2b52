"""Peak resident memory of loading a model to generate, and of converting it, against the issue's target.

Each case runs in a fresh process (so its peak RSS, Linux's VmHWM, is its own):

  * generate: `gemma_jax.load(CKPT, dtype="float32")` on one device, then a short greedy streamed
    completion (--new-tokens), as `gemma-jax generate` does: load, compile and decode.
  * convert -> hf / orbax: `gemma_jax.convert.convert(CKPT, tmp, to=...)`, float32 kept as stored.

Target (issue #16): peak RSS <= 1.5 x the float32 parameter bytes + 500 MB (Gemma 3 270M: ~268M
parameters, 1.07 GB as float32 -> 2.1 GB).

    python benchmarks/load_memory.py [--ckpt gemma3-270m] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile

CHILD = """
import json, sys
from gemma_jax.convert import peak_rss
ckpt, case, new_tokens, scratch = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if case == "generate":
    import gemma_jax
    model = gemma_jax.load(ckpt, dtype="float32")
    model.complete(["The capital of France is"], max_new_tokens=new_tokens, stream=lambda row, text: None)
else:
    from gemma_jax.convert import convert
    convert(ckpt, scratch + "/out", to=case.split()[-1], quiet=True)
print(json.dumps(peak_rss()))
"""
CASES = ("generate", "convert -> hf", "convert -> orbax")


def float32_bytes(ckpt: str) -> int:
    from gemma_jax.models import tensor_specs
    from gemma_jax.checkpoint import open_source
    from gemma_jax.checkpoint.resolve import checkpoint_path

    config = open_source(checkpoint_path(ckpt)).config
    return sum(4 * math.prod(s.shape) for s in tensor_specs(config).values())


def peak(ckpt: str, case: str, new_tokens: int) -> int:
    with tempfile.TemporaryDirectory(prefix="load-memory-") as scratch:
        out = subprocess.run([sys.executable, "-c", CHILD, ckpt, case, str(new_tokens), scratch],
                             stdout=subprocess.PIPE, check=True)  # fmt: skip
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="gemma3-270m")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    params = float32_bytes(args.ckpt)
    target = 1.5 * params + 500e6
    print(f"{args.ckpt}: float32 parameters {params / 1e9:.2f} GB; target peak RSS <= 1.5 x that + 0.5 = {target / 1e9:.2f} GB")
    print(f"| {'case':16s} | peak RSS GB | / target | verdict |\n|{'-' * 18}|-------------|----------|---------|")
    ok = True
    for case in CASES:
        rss = peak(args.ckpt, case, args.new_tokens)
        ok &= rss <= target
        print(f"| {case:16s} | {rss / 1e9:11.2f} | {rss / target:8.2f} | {'OK' if rss <= target else 'OVER':7s} |", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
