"""Time to first token of `gemma-jax generate`, first run (empty compilation cache) against the
runs after it (programs read back from the cache), side by side in one run.

    python benchmarks/compile_cache.py --ckpt gemma3-270m --runs 3

Each run is a fresh process with GEMMA_JAX_CACHE pointing at a new temporary directory (the
demo checkpoint, if used, is created there on the first run). Prints a table: the CLI's own
load and first-token times (the latter counted from the end of loading, compilation included) and
what a user waits, from launching the process to the first character of output; and the ratio of
each later run's times to the first's (issue #17's target: <= 30%).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time

SUMMARY = re.compile(r"load ([\d.]+)s, first token ([\d.]+)s")


def run_once(ckpt: str, max_new_tokens: int, env: dict) -> tuple[float, float, float]:
    """(load s, first token s after loading, launch to first printed character s) of one `gemma-jax generate`."""
    start = time.perf_counter()
    process = subprocess.Popen(["gemma-jax", "generate", "--ckpt", ckpt, "--prompt", "The capital of France is",
                                "--max-new-tokens", str(max_new_tokens)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    process.stdout.read(1)
    waited = time.perf_counter() - start
    _, stderr = process.communicate()
    if process.returncode:
        raise RuntimeError(stderr[-2000:])
    load, first = map(float, SUMMARY.search(stderr).groups())
    return load, first, waited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="gemma3-270m")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "GEMMA_JAX_CACHE": cache}
        rows = [run_once(args.ckpt, args.max_new_tokens, env) for _ in range(args.runs)]
    print("| run | cache | load s | first token s (after load, incl. compile) | / first run | launch to first token s | / first run |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for run, (load, first, waited) in enumerate(rows, 1):
        print(f"| {run} | {'empty' if run == 1 else 'warm'} | {load:.1f} | {first:.1f} | {first / rows[0][1]:.0%} "
              f"| {waited:.1f} | {waited / rows[0][2]:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
