"""Time to first token of `gemma-jax generate`, first run (empty compilation cache) against the
runs after it (programs read back from the cache), side by side in one run.

    python benchmarks/compile_cache.py --ckpt gemma3-270m --runs 3

Each run is a fresh process with GEMMA_JAX_CACHE pointing at a new temporary directory (the
demo checkpoint, if used, is created there on the first run). Prints a table and the ratio of
each later run's time to first token to the first's (issue #17's target: <= 30%).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

SUMMARY = re.compile(r"load ([\d.]+)s, first token ([\d.]+)s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="gemma3-270m")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "GEMMA_JAX_CACHE": cache}
        rows = []
        for run in range(args.runs):
            done = subprocess.run(["gemma-jax", "generate", "--ckpt", args.ckpt, "--prompt", "The capital of France is",
                                   "--max-new-tokens", str(args.max_new_tokens)],
                                  env=env, capture_output=True, text=True, check=True)  # fmt: skip
            load, first = map(float, SUMMARY.search(done.stderr).groups())
            rows.append((run + 1, load, first))
    print("| run | cache | load s | first token s (incl. compile) | / first run |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for run, load, first in rows:
        print(f"| {run} | {'empty' if run == 1 else 'warm'} | {load:.1f} | {first:.1f} | {first / rows[0][2]:.0%} |")


if __name__ == "__main__":
    main()
