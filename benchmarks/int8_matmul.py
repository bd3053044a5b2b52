"""int8 matmuls (W8A8, W8A16) next to bf16 `jnp.dot` over Gemma 2 projection shapes, with speed-up ratios.

For every projection of each model (q, k/v, o, gate/up, down and the tied head; weights stored
[N K], as the model stores them) and every M (tokens per step: decode 1..64, prefill 512..8192), it times:

  * bf16: `jnp.dot` of bf16 activations and bf16 weights (bf16 out), the float model's matmul;
  * f32 (CPU, or with --dtype float32): the same in float32, the CPU model's compute dtype;
  * w8a8/BACKEND: `kernels.w8a8_matmul` (per-token activation quantization included);
  * w8a16/BACKEND: `kernels.w8a16_matmul`;

for each backend in --backends ("xla" = the plain-XLA reference; "tpu" / "gpu" = our Pallas
kernels, Mosaic / Triton). Ratio = t(bf16) / t(int8): above 1 is a speed-up. Each timing runs
--iters calls inside one jitted loop (so decode-sized calls are not dispatch-bound; the
input's first element is nudged each iteration so XLA cannot hoist the matmul out), best of
--repeats, divided by --iters.

On CPU the Pallas backends only run in interpret mode, which is a correctness tool, not a
speed path, so the CPU default is the XLA reference; its numbers say what XLA's CPU int8 dot
costs, not what a TPU or GPU will do. Examples:

    python benchmarks/int8_matmul.py                                   # CPU: 2B, a few M
    python benchmarks/int8_matmul.py --models 2b 9b 27b --backends xla,gpu   # GPU
    python benchmarks/int8_matmul.py --models 2b 9b 27b --backends xla,tpu   # TPU
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.kernels import Kernels, w8a8_matmul, w8a16_matmul

DECODE_M = (1, 8, 16, 32, 64)
PREFILL_M = (512, 1024, 2048, 4096, 8192)


def projections(preset: str) -> dict[str, tuple[int, int]]:
    """name -> (K, N) for one model's matmuls."""
    c = GemmaConfig.from_preset(preset)
    D, F = c.embed_dim, c.mlp_dim
    return {
        "q": (D, c.num_heads * c.head_dim),
        "kv": (D, c.num_kv_heads * c.head_dim),
        "o": (c.num_heads * c.head_dim, D),
        "gate/up": (D, F),
        "down": (F, D),
        "head": (D, c.vocab_size),
    }


def time_loop(fn: Callable, x: jax.Array, weights: tuple, iters: int, repeats: int) -> float:
    """Seconds per call of fn(x, *weights): `iters` calls in one compiled loop, best of `repeats`."""

    @jax.jit
    def loop(x, *weights):
        def body(_, carry):
            x, total = carry
            first = fn(x, *weights)[0, 0].astype(jnp.float32)
            return x.at[0, 0].add((first * 0).astype(x.dtype)), total + first  # a true dependence, ~free

        return jax.lax.fori_loop(0, iters, body, (x, jnp.float32(0)))[1]

    loop(x, *weights).block_until_ready()  # compile + warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        loop(x, *weights).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best / iters


def default_iters(m: int) -> int:
    """Calls per timed loop: enough to hide dispatch on accelerators; few on CPU, where one prefill call takes seconds."""
    if jax.default_backend() == "cpu":
        return 5 if m <= 64 else 1
    return 50 if m <= 64 else 10


def candidates(dtype, backends: list[str]) -> dict[str, tuple[Callable, str]]:
    """column name -> (function of (x, *weights), which weights it takes: "float" or "int8")."""
    dot = lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))  # x [M K] . w [N K]ᵀ, in x's dtype
    cols = {"bf16": (lambda x, w: dot(x.astype(jnp.bfloat16), w), "bf16")}
    if jnp.dtype(dtype) != jnp.bfloat16:
        cols[jnp.dtype(dtype).name] = (dot, "float")
    for b in backends:
        kernels = Kernels.for_platform(int8=b)
        cols[f"w8a8/{b}"] = (lambda x, q, s, k=kernels: w8a8_matmul(x, q, s, w_transposed=True, kernels=k), "int8")
        cols[f"w8a16/{b}"] = (lambda x, q, s, k=kernels: w8a16_matmul(x, q, s, w_transposed=True, kernels=k), "int8")
    return cols


def run(args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for model in args.models:
        for name, (K, N) in projections(f"gemma2-{model}").items():
            wq = jnp.asarray(rng.integers(-127, 128, (N, K), dtype=np.int8))
            ws = jnp.asarray(rng.uniform(1e-3, 1e-2, N).astype(np.float32))
            w = (wq.astype(jnp.float32) * ws[:, None]).astype(args.dtype)
            weights = {"bf16": (w.astype(jnp.bfloat16),), "float": (w,), "int8": (wq, ws)}
            for m in args.m:
                x = jnp.asarray(rng.normal(size=(m, K)), args.dtype)
                row = dict(model=model, proj=name, M=m, K=K, N=N)
                for col, (fn, kind) in candidates(args.dtype, args.backends).items():
                    row[col] = time_loop(fn, x, weights[kind], args.iters or default_iters(m), args.repeats) * 1e3  # ms
                print(format_row(row, args), flush=True)
                rows.append(row)
            del wq, ws, w, weights
    return rows


def format_row(row: dict, args) -> str:
    times = {k: v for k, v in row.items() if k not in ("model", "proj", "M", "K", "N")}
    cells = [f"{row['model']:>3} {row['proj']:>7} M={row['M']:<5} K={row['K']:<6} N={row['N']:<6}"]
    cells += [f"{k} {v:9.3f} ms" + (f" ({row['bf16'] / v:4.2f}x)" if k != "bf16" else "") for k, v in times.items()]
    return " | ".join(cells)


def summary(rows: list[dict]) -> None:
    """Geometric-mean speed-up of each int8 column over each float baseline, decode (M <= 64) and prefill (M >= 512) apart."""
    timed = [k for k in rows[0] if k not in ("model", "proj", "M", "K", "N")]
    baselines, int8 = [k for k in timed if "/" not in k], [k for k in timed if "/" in k]
    for base in baselines:
        print(f"\ngeometric mean of t({base}) / t(column)")
        for regime, keep in (("decode  M<=64", lambda m: m <= 64), ("prefill M>=512", lambda m: m >= 512)):
            chosen = [r for r in rows if keep(r["M"])]
            if chosen:
                means = {c: math.exp(np.mean([math.log(r[base] / r[c]) for r in chosen])) for c in int8}
                print(f"  {regime}: " + ", ".join(f"{c} {v:.2f}x" for c, v in means.items()))


def main() -> None:
    cpu = jax.default_backend() == "cpu"
    platform_kernel = {"tpu": "tpu", "gpu": "gpu"}.get(jax.default_backend())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["2b", "9b", "27b"], default=["2b"] if cpu else ["2b", "9b", "27b"])
    p.add_argument("--m", nargs="+", type=int, default=[1, 16, 64, 512] if cpu else list(DECODE_M + PREFILL_M))
    p.add_argument("--backends", default="xla" if cpu else f"xla,{platform_kernel}", help="comma-separated: xla,tpu,gpu")
    p.add_argument("--dtype", default="float32" if cpu else "bfloat16", help="activation dtype (CPU models run float32)")
    p.add_argument("--iters", type=int, default=0, help="calls per timed loop (default 50 decode, 10 prefill; CPU 5, 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    args.backends = args.backends.split(",")
    args.dtype = jnp.dtype(args.dtype)
    if cpu and set(args.backends) - {"xla"}:
        print("note: Pallas backends run in interpret mode on CPU; their times are not kernel speed")
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}, jax {jax.__version__}, dtype {args.dtype.name}")
    rows = run(args)
    summary(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=f"{device.platform} {device.device_kind}", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
