"""Training throughput and MFU of gemma_jax next to a transformers + PyTorch training step of the same model.

What it measures: one full fine-tuning optimizer step on a batch of --batch rows x --seq tokens
(every token a target), best and median of --steps timed steps after one warm-up step.
  * ours: `gemma_jax.train.step` — the jitted step `gemma-jax finetune` runs: forward, backward,
    global-norm clipping and AdamW (float32 master weights and moments), activations in
    --dtype, --remat policy, on a mesh of every device (fsdp).
  * transformers: `AutoModelForCausalLM` (eager attention) loaded from the very same
    checkpoint, float32 weights, the same loss (token cross-entropy over the same targets),
    `clip_grad_norm_` and `torch.optim.AdamW`; bfloat16 via `torch.autocast`; torch threads = cores.
MFU = tokens/s x model FLOPs per token (`gemma_jax.train.metrics.flops_per_token`: 6 x weights
+ attention, no recomputation) / peak FLOP/s — the published bf16 peak on TPUs/GPUs, a measured
1024^3 matmul rate in --dtype on CPUs — the same peak for both frameworks. "first loss" checks
that both start from the same model (they agree to float precision).

A random model is built from --preset with --layers layers (and --vocab rows) and saved with
`save_hf` to a temporary directory, so both frameworks load the very same weights. Example:

    python benchmarks/train.py --preset gemma2-2b --layers 2 --vocab 32000 --batch 4 --seq 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

import gemma_jax
from gemma_jax.checkpoint.hf import save_hf
from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.models import init_params
from gemma_jax.train.config import TrainConfig
from gemma_jax.train.metrics import flops_per_token, peak_flops
from gemma_jax.train.step import StepSpec, compiled, default_compute_dtype
from gemma_jax.sharding import RULE_SETS, Layout, make_mesh, place

Row = dict[str, float]  # "best", "median" step seconds, "compile" seconds, "loss" of the first step


def time_steps(step: Callable[[], float], steps: int) -> Row:
    """Run `step` (returns the loss once the step is done) once to warm up, then `steps` timed times."""
    start = time.perf_counter()
    loss = step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"best": min(times), "median": statistics.median(times), "compile": first - min(times), "loss": loss}


def time_ours(ckpt: Path, batch: dict[str, np.ndarray], args: argparse.Namespace) -> Row:
    layout = Layout(make_mesh("fsdp=-1"), RULE_SETS["training"])
    model = gemma_jax.load(ckpt, dtype="float32", mesh=layout.mesh, rules="training")
    B, T = batch["inputs"].shape
    cfg = TrainConfig(ckpt=str(ckpt), data="-", out="-", seq_len=T, batch_size=B, compute_dtype=args.dtype, remat=args.remat,
                      learning_rate=1e-5, warmup_steps=0)  # fmt: skip
    fns = compiled(StepSpec.create(cfg, model.config, layout))
    state = [fns.fresh_state(model.params, seed=0)]
    placed = {k: place(v[None], fns.batch[k]) for k, v in batch.items()}

    def step() -> float:
        state[0], metrics = fns.train(state[0], {}, placed)
        return float(metrics["loss"])

    return time_steps(step, args.steps)


def time_transformers(ckpt: Path, batch: dict[str, np.ndarray], args: argparse.Namespace) -> Row:
    import contextlib

    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    transformers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    hf = hf.to(device).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    inputs, targets = (torch.as_tensor(batch[k], dtype=torch.long, device=device) for k in ("inputs", "targets"))
    autocast = torch.autocast(device, dtype=torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()

    def step() -> float:
        with autocast:
            logits = hf(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # waits for the device

    return time_steps(step, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gemma2-2b")
    parser.add_argument("--layers", type=int, default=2, help="layers of the random model (0: the preset's)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of the random model (0: the preset's)")
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    parser.add_argument("--dtype", default=default_compute_dtype(), choices=["float32", "bfloat16"], help="activations")
    parser.add_argument("--remat", default="none", choices=["none", "block", "dots"])
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    config = GemmaConfig.from_preset(args.preset)
    config = config.replace(num_layers=args.layers or config.num_layers, vocab_size=args.vocab or config.vocab_size)
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, device.platform, args.dtype) * jax.device_count()
    per_token = flops_per_token(config, args.seq)
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    batch = {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((args.batch, args.seq), np.float32),
        "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy(),
        "segments": np.ones((args.batch, args.seq), np.int32),
    }  # fmt: skip
    rows: dict[str, Row] = {}
    with tempfile.TemporaryDirectory() as tmp:
        params = jax.tree.map(np.asarray, init_params(config, jax.random.PRNGKey(0)))
        ckpt = save_hf(Path(tmp) / "model", config, params)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        del params
        rows["gemma_jax"] = time_ours(ckpt, batch, args)
        if not args.skip_transformers:
            rows["transformers"] = time_transformers(ckpt, batch, args)

    n_tokens = args.batch * args.seq
    print(f"{args.preset} with {config.num_layers} layers, vocab {config.vocab_size}: {n_params / 1e6:.1f}M params; "
          f"batch {args.batch} x {args.seq} tokens; activations {args.dtype}, remat {args.remat}; "
          f"{jax.device_count()} x {device.device_kind} ({device.platform}), peak {peak / 1e12:.2f} TFLOP/s; "
          f"{per_token / 1e6:.1f} MFLOP/token")  # fmt: skip
    print(f"{'framework':<14}{'step s (best)':>14}{'median':>9}{'tokens/s':>11}{'MFU':>8}{'compile s':>11}{'first loss':>12}")
    for name, r in rows.items():
        rate = n_tokens / r["best"]
        mfu = rate * per_token / peak
        print(f"{name:<14}{r['best']:>14.4f}{r['median']:>9.4f}{rate:>11,.0f}{mfu:>8.1%}{r['compile']:>11.2f}{r['loss']:>12.5f}")
    if "transformers" in rows:
        print(f"ratio gemma_jax / transformers: {rows['transformers']['best'] / rows['gemma_jax']['best']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
