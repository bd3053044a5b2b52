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
    (attn_implementation="eager", same dtype, torch threads = --threads), timed the same way with
    generate(do_sample=False, min_new_tokens=N, max_new_tokens=N) after a 2-token warm-up run;
    "ratio" = ours / transformers. A GGUF checkpoint is read by transformers' own GGUF loader
    (dequantized to --dtype).
  * llama.cpp (llama-cpp-python, batch 1 only: its high-level API decodes one sequence): the
    GGUF of the same model (--gguf, or the checkpoint itself when it is a GGUF file, e.g.
    `--ckpt gemma3-270m`), plus GGUFs that `save_gguf` writes from the loaded weights at the
    --gguf-export types (f32 is the same width as our float32). Same prompt (batch row 0), greedy
    via `Llama.generate(temp=0)`, --threads threads, timed like ours after a 2-token warm-up; BW util
    counts the file's tensor bytes plus an F16 KV cache. "ratio llama" = ours / llama.cpp decode.

--quant w8a16|w8a8 times ours with int8 weights (quantized on load; the BW column counts the int8
bytes), the width of llama.cpp's Q8_0 (`--gguf-export q8_0`); transformers stays float.

--ckpt is a Hugging Face directory, a GGUF file, or a name: "gemma3-270m" (the real model of
the `gemma3` extra) or "tiny". Without --ckpt a random model is built from --preset with
--layers layers and saved once with `save_hf` to a temporary directory, so every framework
loads the very same weights. Examples:

    python benchmarks/decode.py --preset gemma2-2b --layers 2 --batch 1 8 --new-tokens 16
    python benchmarks/decode.py --ckpt gemma3-270m --batch 1 8 16 --gguf-export f32 q8_0
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gemma_jax
from gemma_jax.checkpoint.gguf import GGUFFileReader, save_gguf
from gemma_jax.checkpoint.hf import save_hf
from gemma_jax.checkpoint.resolve import checkpoint_path
from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.generate import bucket, generate
from gemma_jax.models import init_params
from gemma_jax.quant import quantize_params, tree_bytes
from gemma_jax.sampling import Sampler

Times = dict[int, dict[str, float]]  # batch -> {"t1", "tN", "compile", "hf_t1", "hf_tN"} seconds
LlamaRow = dict[str, object]  # one llama.cpp GGUF: {"name", "type", "bytes", "t1", "tN"}


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


def busy_cores(seconds: float = 1.0) -> float:
    """Cores' worth of CPU time that other processes use, from /proc/stat over `seconds` (NaN off Linux)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    try:
        (total0, idle0), _ = sample(), time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def random_checkpoint(args: argparse.Namespace, root: str) -> Path:
    config = GemmaConfig.from_preset(args.preset)
    config = config.replace(num_layers=args.layers or config.num_layers, vocab_size=args.vocab or config.vocab_size)
    params = jax.tree.map(lambda x: np.asarray(x.astype(args.dtype)), init_params(config, jax.random.PRNGKey(0)))
    return save_hf(Path(root) / "model", config, params)


def step_cost(
    config: GemmaConfig, n_params: int, batch: int, context: float, itemsize: int, weight_bytes: float | None = None
) -> tuple[float, float]:
    """(bytes read, matmul FLOPs) of one decode step over `context` tokens of KV cache (at `itemsize`);
    the weights count n_params * itemsize bytes unless `weight_bytes` is given (a quantized file)."""
    norms = config.embed_dim * (2 + 2 * config.use_post_norms) * config.num_layers
    kv_bytes = attn_flops = 0.0
    for kind in config.layer_kinds:
        seen = min(context, config.sliding_window) if kind == "local" else context
        kv_bytes += 2 * batch * seen * config.num_kv_heads * config.head_dim * itemsize
        attn_flops += 4 * batch * seen * config.num_heads * config.head_dim
    weights = n_params * itemsize if weight_bytes is None else weight_bytes
    return weights + kv_bytes, 2 * batch * (n_params - norms) + attn_flops


@contextlib.contextmanager
def fast_gguf_reader() -> Iterator[None]:
    """transformers parses GGUF with `gguf.GGUFReader`; hand it ours (the same parser without np.memmap's
    slicing overhead, which costs about a minute on Gemma 3's 262k token strings)."""
    import gguf

    original, gguf.GGUFReader = gguf.GGUFReader, GGUFFileReader
    try:
        yield
    finally:
        gguf.GGUFReader = original


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
                dtype=model.compute_dtype, quant=model.quant,
            )  # fmt: skip
            run()  # warm-up: traces and compiles
            r[key] = best_time(run, repeats)
        r["compile"] = compiling[0] - before
    return times


def time_transformers(ckpt: Path, args: argparse.Namespace, prompts: dict[int, np.ndarray], times: Times) -> list[str]:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    dtype = getattr(torch, args.dtype)
    where = (ckpt.parent, {"gguf_file": ckpt.name}) if ckpt.is_file() else (ckpt, {})  # a GGUF file or an HF dir
    with fast_gguf_reader():
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            where[0], **where[1], dtype=dtype, attn_implementation="eager"
        ).eval()
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


def gguf_bytes(path: Path) -> tuple[int, str]:
    """(tensor bytes, the types of its matrices) of a GGUF file."""
    tensors = GGUFFileReader(path).tensors
    kinds = sorted({t.tensor_type.name for t in tensors if len(t.shape) > 1})
    return sum(int(t.n_bytes) for t in tensors), "+".join(kinds)


def time_llama_cpp(path: Path, prompt: np.ndarray, n_new: int, repeats: int, threads: int) -> dict[str, float]:
    """Batch-1 greedy prefill and decode times of llama.cpp on a GGUF file (as `time_ours`)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=bucket(len(prompt) + n_new), n_batch=len(prompt), n_ubatch=len(prompt),
        n_threads=threads, n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    ids = [int(t) for t in prompt]

    def run(n: int) -> None:
        llm.reset()  # no reuse of the previous run's KV cache
        for i, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0), 1):
            if i == n:
                break

    run(2)  # warm-up
    times = {"t1": best_time(lambda: run(1), repeats), "tN": best_time(lambda: run(n_new), repeats)}
    llm.close()
    return times


def llama_cpp_files(
    args: argparse.Namespace, ckpt: Path, model: gemma_jax.Gemma, root: str, notes: list[str]
) -> list[tuple[str, Path]]:
    """(label, path) of each GGUF llama.cpp runs: --gguf (or the checkpoint itself), then --gguf-export types."""
    files = []
    given = Path(args.gguf).expanduser() if args.gguf else ckpt if ckpt.is_file() else None
    if given is not None:
        files.append((given.name, given))
    if args.gguf_export and model.tokenizer is None:  # a GGUF carries its tokenizer; llama.cpp needs one
        notes.append("--gguf-export skipped: this checkpoint has no tokenizer")
        return files
    for kind in args.gguf_export:
        dest = save_gguf(Path(root) / f"export-{kind}.gguf", model.config, model.params, model.tokenizer, type=kind)
        files.append((f"ours as {kind}", dest))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="HF directory, GGUF file, 'gemma3-270m' or 'tiny' (default: random --preset)")
    parser.add_argument("--preset", default="gemma2-2b")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random model (0: the preset's)")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary of the random model (0: the preset's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (the best is kept)")
    parser.add_argument("--quant", choices=["w8a16", "w8a8"], help="ours with int8 weights (vs llama.cpp's Q8_0)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--gguf", help="llama.cpp: a GGUF of the same model (default: --ckpt when it is a GGUF)")
    parser.add_argument("--gguf-export", nargs="*", default=[], choices=["f32", "f16", "bf16", "q8_0"],
                        help="llama.cpp: also time GGUFs that save_gguf writes from our weights at these types")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="cores for every engine: the process is pinned to this many (XLA sizes its pool from "
                             "them), torch and llama.cpp get as many threads (default: all)")  # fmt: skip
    args = parser.parse_args()
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])  # before jax starts its CPU backend
    T, N, notes = args.prompt_len, args.new_tokens, []
    busy_at_start = busy_cores()  # before this run's own work
    bandwidth, bandwidth_how, peak_flops = machine_rates()  # first, while memory is free

    llama: list[LlamaRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint_path(args.ckpt) if args.ckpt else random_checkpoint(args, tmp)
        model = gemma_jax.load(ckpt, dtype=args.dtype, compute_dtype=args.dtype)
        config, n_params = model.config, sum(x.size for x in jax.tree.leaves(model.params))
        gguf_files = [] if args.skip_llama_cpp else llama_cpp_files(args, ckpt, model, tmp, notes)  # from float weights
        weight_bytes = None
        if args.quant:
            params = quantize_params(config, model.params, args.quant)
            model = gemma_jax.Gemma(config, params, model.tokenizer, compute_dtype=args.dtype, quant=args.quant)
            weight_bytes = tree_bytes(params)
            notes.append(f"ours runs {args.quant} weights ({weight_bytes / 1e9:.2f} GB; transformers stays {args.dtype})")
        rng = np.random.default_rng(0)
        prompts = {b: rng.integers(3, config.vocab_size, (b, T)) for b in args.batch}
        times = time_ours(model, prompts, N, args.repeats)
        del model
        if args.skip_transformers:
            notes.append("transformers not run (--skip-transformers)")
        else:
            notes += time_transformers(ckpt, args, prompts, times)
        if args.skip_llama_cpp:
            notes.append("llama.cpp not run (--skip-llama-cpp)")
        elif not gguf_files:
            notes.append("llama.cpp not run: no GGUF of this model (--gguf PATH, or --gguf-export f32)")
        for label, path in gguf_files:
            try:
                nbytes, kinds = gguf_bytes(path)
                llama.append({"name": label, "type": kinds, "bytes": nbytes,
                              **time_llama_cpp(path, prompts[min(prompts)][0], N, args.repeats, args.threads)})  # fmt: skip
            except Exception as e:  # ImportError included: keep the rest of the report
                notes.append(f"llama.cpp failed on {label}: {type(e).__name__}: {e}")

    itemsize, context, cores = jnp.dtype(args.dtype).itemsize, T + N / 2, args.threads
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {cores} of {os.cpu_count()} cores used ({busy_at_start:.2f} busy with other work at the start, "
          f"load average {load} at the end), "
          f"jax {jax.__version__} on {jax.default_backend()}")  # fmt: skip
    print(f"  bandwidth {bandwidth / 1e9:.1f} GB/s ({bandwidth_how}), f32 matmul {peak_flops / 1e9:.0f} GFLOP/s")
    shape = f"D={config.embed_dim} F={config.mlp_dim} heads={config.num_heads}/{config.num_kv_heads}x{config.head_dim}"
    print(f"model: {args.ckpt or 'random ' + args.preset}, {config.model_type}, {config.num_layers} layers, {shape}, "
          f"V={config.vocab_size}; {n_params / 1e6:.0f}M params = {n_params * itemsize / 1e9:.2f} GB in {args.dtype}")
    print(f"run: prompt {T} tokens, {N} new tokens, greedy; KV cache counted at {context:.0f} tokens of context\n")
    head = ["batch", "compile s", "prefill tok/s", "decode tok/s", "step ms", "BW util %", "compute %",
            "HF prefill", "HF decode", "ratio prefill", "ratio decode", "llama decode", "ratio llama"]  # fmt: skip
    print("  ".join(f"{h:>13}" for h in head))
    nan = float("nan")
    rate = lambda b, t1, tN: b * (N - 1) / (tN - t1) if N > 1 and tN > t1 else nan  # noqa: E731
    llama_dec = rate(1, llama[0]["t1"], llama[0]["tN"]) if llama else nan  # batch 1 only
    for b, r in times.items():
        dec = rate(b, r["t1"], r["tN"])
        nbytes, flops = step_cost(config, n_params, b, context, itemsize, weight_bytes)
        hf_pre = b * T / r["hf_t1"] if "hf_t1" in r else nan
        hf_dec = rate(b, r["hf_t1"], r["hf_tN"]) if "hf_tN" in r else nan
        pre, step, ll = b * T / r["t1"], b / dec, llama_dec if b == 1 else nan
        row = [b, r["compile"], pre, dec, step * 1e3, 100 * nbytes / step / bandwidth,
               100 * flops / step / peak_flops, hf_pre, hf_dec, pre / hf_pre, dec / hf_dec, ll, dec / ll]  # fmt: skip
        print("  ".join(f"{v:>13}" if isinstance(v, int) else f"{'-' if math.isnan(v) else f'{v:.3g}':>13}" for v in row))
    if llama:
        import llama_cpp

        ours_1 = rate(1, times[1]["t1"], times[1]["tN"]) if 1 in times else nan
        hf_1 = rate(1, times[1]["hf_t1"], times[1]["hf_tN"]) if "hf_tN" in times.get(1, {}) else nan
        print(f"\nllama.cpp (llama-cpp-python {llama_cpp.__version__}), batch 1, {cores} threads; "
              "ratios: ours / llama.cpp and transformers / llama.cpp decode at batch 1")  # fmt: skip
        head = ["gguf", "matrices", "GB", "prefill tok/s", "decode tok/s", "step ms", "BW util %", "ours/llama", "HF/llama"]
        print(f"{head[0]:>22}  {head[1]:>18}" + "".join(f"  {h:>13}" for h in head[2:]))
        for r in llama:
            dec = rate(1, r["t1"], r["tN"])
            nbytes = step_cost(config, n_params, 1, context, 2, weight_bytes=r["bytes"])[0]  # F16 KV cache
            row = [r["bytes"] / 1e9, T / r["t1"], dec, 1e3 / dec, 100 * nbytes * dec / bandwidth, ours_1 / dec, hf_1 / dec]
            print(f"{r['name']:>22}  {r['type']:>18}" + "".join(f"  {'-' if math.isnan(v) else f'{v:.3g}':>13}" for v in row))
    if N < 2 or any(r["tN"] <= r["t1"] for r in [*times.values(), *llama]):
        notes.append("decode rate not measurable where t_N <= t_1 (use more --new-tokens)")
    padded = [f"{b} -> {bucket(b, 1)}" for b in times if bucket(b, 1) != b]
    if padded:
        notes.append(f"ours pads the batch to a power of two ({', '.join(padded)} rows computed)")
    slots = bucket(T) + bucket(N)
    notes.append(f"prefill time includes first-token sampling; our decode step attends over all {slots} KV-buffer "
                 f"slots (prompt + new-token buckets), more than the {context:.0f} counted")  # fmt: skip
    if busy_at_start > (os.cpu_count() or 1) - cores + 0.25:  # the engines' thread pools spin-wait at barriers
        notes.append(f"other processes used {busy_at_start:.1f} of {os.cpu_count()} cores when this run started: "
                     "every rate here is suspect (a preempted thread stalls its pool)")  # fmt: skip
    print("note: " + "; ".join(notes))


if __name__ == "__main__":
    main()
