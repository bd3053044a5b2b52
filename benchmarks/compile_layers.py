"""Scanned layers vs unrolled: compile time against depth, and the same tokens at the same speed.

What it measures, in one run so the ratios are side by side:
  * compile: trace + lower + XLA compile (`jax.jit(...).lower(...).compile()`) of the forward pass
    (`api._forward`, batch 1 x --seq tokens, float32 activations) of the --preset config (default
    Gemma 2 27B) at 2 layers and at its full depth, with abstract bfloat16 weights
    (`jax.ShapeDtypeStruct`: nothing is allocated), unrolled and scanned (`Runtime.scan`). The
    table gives each time and the full/2-layer ratio per mode; the scanned ratio should stay near 1.
  * the real Gemma 3 270M (`gemma3-270m`, the `gemma3` extra): loaded unrolled and scanned (float32),
    greedy tokens of the same prompts (must be identical), and decode step time (best of --repeats:
    (t_N - t_1) / (N - 1), t_k = a `generate` call with k new tokens, after a compiling warm-up).

    python benchmarks/compile_layers.py
    python benchmarks/compile_layers.py --preset gemma3-1b --skip-270m
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import gemma_jax
from gemma_jax.api import _forward
from gemma_jax.generate import generate
from gemma_jax.models import family_of, init_params, preset
from gemma_jax.runtime import Runtime
from gemma_jax.sampling import Sampler


def compile_seconds(config, scan: bool, seq: int) -> float:
    """Seconds to trace, lower and compile the forward of `config` over abstract bfloat16 weights."""
    family = family_of(config)
    params = jax.eval_shape(lambda: family.stack_layers(config, init_params(config, jax.random.PRNGKey(0), jnp.bfloat16)) if scan
                            else init_params(config, jax.random.PRNGKey(0), jnp.bfloat16))  # fmt: skip
    tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    runtime = Runtime.create(config, jnp.float32, scan=scan)
    start = time.perf_counter()
    _forward.lower(params, tokens, tokens, runtime=runtime).compile()
    return time.perf_counter() - start


def compile_table(name: str, seq: int) -> None:
    full = preset(name)
    depths = (2, full.num_layers)
    times = {(scan, n): compile_seconds(full.replace(num_layers=n), scan, seq) for scan in (False, True) for n in depths}
    print(f"\n{name}: forward compile time (lower + compile, abstract bf16 weights, CPU, 1 x {seq} tokens)")
    print(f"{'mode':10} {f'{depths[0]} layers s':>12} {f'{depths[1]} layers s':>13} {'ratio':>7}")
    for scan in (False, True):
        a, b = times[(scan, depths[0])], times[(scan, depths[1])]
        print(f"{'scanned' if scan else 'unrolled':10} {a:12.2f} {b:13.2f} {b / a:7.2f}")
    print(f"scanned / unrolled at {depths[1]} layers: {times[(True, depths[1])] / times[(False, depths[1])]:.2f}")


def decode_seconds(model, prompts: list[list[int]], new: int, repeats: int) -> tuple[list[list[int]], float]:
    """(greedy tokens of `new` steps, seconds per decode step) of `model` on `prompts`."""
    run = lambda n: generate(model.config, model.params, prompts, max_new_tokens=n, sampler=Sampler(), stop_ids=(),
                             runtime=model.runtime)  # fmt: skip
    run(1), run(new)  # compile
    best = lambda n: min(_timed(lambda: run(n)) for _ in range(repeats))
    t1, tn = best(1), best(new)
    return run(new).tokens, (tn - t1) / (new - 1)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def real_270m(new: int, batch: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    prompts = [[2] + rng.integers(3, 20_000, 63).tolist() for _ in range(batch)]
    results = {}
    for scan in (False, True):
        model = gemma_jax.load("gemma3-270m", dtype="float32", scan=scan)
        results[scan] = decode_seconds(model, prompts, new, repeats)
    same = results[False][0] == results[True][0]
    print(f"\ngemma3-270m (real weights, float32, batch {batch}, 64-token prompts, {new} new tokens, greedy)")
    print(f"greedy tokens identical scanned vs unrolled: {same}")
    print(f"{'mode':10} {'decode ms/step':>15}")
    for scan in (False, True):
        print(f"{'scanned' if scan else 'unrolled':10} {results[scan][1] * 1e3:15.2f}")
    print(f"scanned / unrolled decode step: {results[True][1] / results[False][1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gemma2-27b")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-270m", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    if not args.skip_compile:
        compile_table(args.preset, args.seq)
    if not args.skip_270m:
        real_270m(args.new_tokens, args.batch, args.repeats)


if __name__ == "__main__":
    main()
