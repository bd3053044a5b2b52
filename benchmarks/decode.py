"""Prefill and decode throughput of gemma_jax next to transformers, with memory-bandwidth utilisation.

What it measures, per batch size B (greedy decoding, random prompts of --prompt-len tokens):
  * ours: `gemma_jax.generate.generate` (one jitted prefill + decode-loop program per shape bucket),
    with `stop_ids=()` so no row stops early. Each program runs once to compile (warm-up), then is
    timed (best of --repeats runs). t_1 = time with max_new_tokens=1 (prefill + first token),
    t_N = time with N new tokens; prefill tok/s = B*prompt_len/t_1, decode tok/s = B*(N-1)/(t_N - t_1).
    "compile s" = jax's trace + lower + XLA compile time of both programs, summed from
    `jax.monitoring` events during the warm-ups.
  * BW util: bytes one decode step must read (every weight at the compute dtype, the tied embedding
    once as the output head, plus the KV cache at the average context length prompt_len + N/2)
    / step time / the machine's bandwidth, measured in this run as the best of a jax sum-reduction
    and a numpy copy over 1 GiB (best of 5 each). "compute %" = the step's matmul FLOPs / step time
    / the best f32 rate of a 2048^3 jax matmul: on few cores decode at B >= 8 is compute-bound.
  * transformers: the same checkpoint directory and prompts in PyTorch eager
    (attn_implementation="eager", same dtype, torch threads = cores), timed the same way with
    generate(do_sample=False, min_new_tokens=N, max_new_tokens=N) after a 2-token warm-up run;
    "ratio" = ours / transformers.

Without --ckpt a random model is built from --preset with --layers layers and saved once with
`save_hf` to a temporary directory, so both frameworks load the very same weights. Example:

    python benchmarks/decode.py --preset gemma2-2b --layers 2 --batch 1 8 --new-tokens 16
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gemma_jax
from gemma_jax.checkpoint.hf import save_hf
from gemma_jax.config import GemmaConfig
from gemma_jax.generate import bucket, generate
from gemma_jax.model import init_params
from gemma_jax.sampling import Sampler

Times = dict[int, dict[str, float]]  # batch -> {"t1", "tN", "compile", "hf_t1", "hf_tN"} seconds


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_rates() -> tuple[float, str, float]:
    """(bandwidth bytes/s, how it was measured, f32 matmul FLOP/s), each the best of 5 runs."""
    host = np.ones(2**28, np.float32)  # 1 GiB
    copy, dev, total = np.empty_like(host), jnp.asarray(host), jax.jit(jnp.sum)
    total(dev).block_until_ready()
    rates = {
        "numpy copy (read+write)": 2 * host.nbytes / best_time(lambda: np.copyto(copy, host), 5),
        "jax sum-reduction": host.nbytes / best_time(lambda: total(dev).block_until_ready(), 5),
    }
    a, matmul = jnp.ones((2048, 2048), jnp.float32), jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    flops = 2 * 2048**3 / best_time(lambda: matmul(a).block_until_ready(), 5)
    how = max(rates, key=rates.__getitem__)
    return rates[how], f"{how}; " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items()) + " GB/s", flops


def random_checkpoint(args: argparse.Namespace, root: str) -> Path:
    config = GemmaConfig.from_preset(args.preset)
    config = config.replace(num_layers=args.layers or config.num_layers, vocab_size=args.vocab or config.vocab_size)
    params = jax.tree.map(lambda x: np.asarray(x.astype(args.dtype)), init_params(config, jax.random.PRNGKey(0)))
    return save_hf(Path(root) / "model", config, params)


def step_cost(config: GemmaConfig, n_params: int, batch: int, context: float, itemsize: int) -> tuple[float, float]:
    """(bytes read, matmul FLOPs) of one decode step over `context` tokens of KV cache."""
    norms = config.embed_dim * (2 + 2 * config.use_post_norms) * config.num_layers
    kv_bytes = attn_flops = 0.0
    for kind in config.layer_kinds:
        seen = min(context, config.sliding_window) if kind == "local" else context
        kv_bytes += 2 * batch * seen * config.num_kv_heads * config.head_dim * itemsize
        attn_flops += 4 * batch * seen * config.num_heads * config.head_dim
    return n_params * itemsize + kv_bytes, 2 * batch * (n_params - norms) + attn_flops


def time_ours(model: gemma_jax.Gemma, prompts: dict[int, np.ndarray], n_new: int, repeats: int) -> Times:
    compiling = [0.0]  # trace + lowering + XLA compile seconds, from jax's monitoring events

    def on_event(name: str, seconds: float, **_: object) -> None:
        if name.startswith("/jax/core/compile/"):
            compiling[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(on_event)
    times: Times = {}
    for b, ids in prompts.items():
        r, before = times.setdefault(b, {}), compiling[0]
        for key, n in (("t1", 1), ("tN", n_new)):
            run = lambda: generate(  # noqa: E731
                model.config, model.params, ids.tolist(), max_new_tokens=n, sampler=Sampler(), stop_ids=(),
                dtype=model.compute_dtype,
            )  # fmt: skip
            run()  # warm-up: traces and compiles
            r[key] = best_time(run, repeats)
        r["compile"] = compiling[0] - before
    return times


def time_transformers(ckpt: Path, args: argparse.Namespace, prompts: dict[int, np.ndarray], times: Times) -> list[str]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    transformers.utils.logging.disable_progress_bar()
    dtype = getattr(torch, args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="eager").eval()
    notes = []
    for b, ids in prompts.items():
        x = torch.as_tensor(ids)
        run = lambda n: hf.generate(  # noqa: E731
            input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, min_new_tokens=n, max_new_tokens=n,
            pad_token_id=hf.config.pad_token_id,
        )  # fmt: skip
        try:
            with torch.inference_mode():
                run(2)  # warm-up of prefill and one decode step (allocator, lazy initialisation)
                times[b]["hf_t1"] = best_time(lambda: run(1), args.repeats)
                times[b]["hf_tN"] = best_time(lambda: run(args.new_tokens), args.repeats)
        except Exception as e:  # keep the rest of the table
            notes.append(f"transformers failed at batch {b}: {type(e).__name__}: {e}")
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="HF checkpoint directory (default: a random model from --preset)")
    parser.add_argument("--preset", default="gemma2-2b")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random model (0: the preset's)")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary of the random model (0: the preset's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (the best is kept)")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    T, N, notes = args.prompt_len, args.new_tokens, []
    bandwidth, bandwidth_how, peak_flops = machine_rates()  # first, while memory is free

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else random_checkpoint(args, tmp)
        model = gemma_jax.load(ckpt, dtype=args.dtype, compute_dtype=args.dtype)
        config, n_params = model.config, sum(x.size for x in jax.tree.leaves(model.params))
        rng = np.random.default_rng(0)
        prompts = {b: rng.integers(3, config.vocab_size, (b, T)) for b in args.batch}
        times = time_ours(model, prompts, N, args.repeats)
        del model
        if args.skip_transformers:
            notes.append("transformers not run (--skip-transformers)")
        else:
            notes += time_transformers(ckpt, args, prompts, times)

    itemsize, context, cores = jnp.dtype(args.dtype).itemsize, T + N / 2, os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {cores} cores (load average {load} at the end), jax {jax.__version__} on {jax.default_backend()}")
    print(f"  bandwidth {bandwidth / 1e9:.1f} GB/s ({bandwidth_how}), f32 matmul {peak_flops / 1e9:.0f} GFLOP/s")
    shape = f"D={config.embed_dim} F={config.mlp_dim} heads={config.num_heads}/{config.num_kv_heads}x{config.head_dim}"
    print(f"model: {args.ckpt or 'random ' + args.preset}, {config.model_type}, {config.num_layers} layers, {shape}, "
          f"V={config.vocab_size}; {n_params / 1e6:.0f}M params = {n_params * itemsize / 1e9:.2f} GB in {args.dtype}")
    print(f"run: prompt {T} tokens, {N} new tokens, greedy; KV cache counted at {context:.0f} tokens of context\n")
    head = ["batch", "compile s", "prefill tok/s", "decode tok/s", "step ms", "BW util %", "compute %",
            "HF prefill", "HF decode", "ratio prefill", "ratio decode"]  # fmt: skip
    print("  ".join(f"{h:>13}" for h in head))
    nan = float("nan")
    for b, r in times.items():
        step = (r["tN"] - r["t1"]) / (N - 1) if N > 1 and r["tN"] > r["t1"] else nan
        nbytes, flops = step_cost(config, n_params, b, context, itemsize)
        hf_pre = b * T / r["hf_t1"] if "hf_t1" in r else nan
        hf_dec = b * (N - 1) / (r["hf_tN"] - r["hf_t1"]) if "hf_tN" in r and r["hf_tN"] > r["hf_t1"] else nan
        pre, dec = b * T / r["t1"], b / step
        row = [b, r["compile"], pre, dec, step * 1e3, 100 * nbytes / step / bandwidth,
               100 * flops / step / peak_flops, hf_pre, hf_dec, pre / hf_pre, dec / hf_dec]  # fmt: skip
        print("  ".join(f"{v:>13}" if isinstance(v, int) else f"{'-' if math.isnan(v) else f'{v:.3g}':>13}" for v in row))
    if N < 2 or any(r["tN"] <= r["t1"] for r in times.values()):
        notes.append("decode rate not measurable where t_N <= t_1 (use more --new-tokens)")
    padded = [f"{b} -> {bucket(b, 1)}" for b in times if bucket(b, 1) != b]
    if padded:
        notes.append(f"ours pads the batch to a power of two ({', '.join(padded)} rows computed)")
    slots = bucket(T) + bucket(N)
    notes.append(f"prefill time includes first-token sampling; our decode step attends over all {slots} KV-buffer "
                 f"slots (prompt + new-token buckets), more than the {context:.0f} counted")  # fmt: skip
    print("note: " + "; ".join(notes))


if __name__ == "__main__":
    main()
