"""Training throughput accounting (model FLOPs, MFU) and the metrics JSONL of a run.

MFU counts the model's useful FLOPs only: the matmuls of the forward pass (2 FLOPs per
multiply-add) plus the backward pass (input gradients always; weight gradients only for
trained weights: all of them in full fine-tuning, the LoRA factors with LoRA), for the
non-padding tokens. Rematerialisation's recomputation is not counted (that would be hardware
FLOPs utilisation), so remat shows up as a lower MFU, which is the point.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from gemma_jax.models import Config
from gemma_jax.plan import CHIPS
from gemma_jax.train.lora import LoraSpec, init_lora, projections

# jax device_kind substrings -> `gemma_jax.plan.CHIPS` entries (published dense bf16 peaks), first match
# wins ("TPU v5" alone is a v5p).
_DEVICE_CHIPS = {
    "v4": "v4", "v5 lite": "v5e", "v5e": "v5e", "v5p": "v5p", "v5": "v5p", "v6 lite": "v6e", "v6e": "v6e",
    "h100": "h100", "h200": "h100",  # the H200's compute is the H100's (more and faster memory)
}  # fmt: skip


def flops_per_token(config: Config, seq_len: int, lora: LoraSpec | None = None) -> float:
    """Model FLOPs of one training token (forward + backward), attention over an average causal context."""
    weights = sum(math.prod(p.shape) for p in projections(config).values()) + config.vocab_size * config.embed_dim
    attention = 0.0  # QK^T and PV: 2 matmuls x 2 FLOPs x heads x head_dim x visible keys, per layer
    for kind in config.layer_kinds:
        window = seq_len if kind == "global" else min(seq_len, config.sliding_window)
        context = (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len  # mean of min(p + 1, window)
        attention += 4 * config.num_heads * config.head_dim * context
    forward = 2 * weights + attention
    if lora is None:
        return 3 * forward  # forward, input gradients, weight gradients
    adapters = sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: init_lora(config, lora, jax.random.PRNGKey(0)))))
    return 2 * forward + 3 * 2 * adapters  # the frozen weights get no gradient; the adapters get all three


@functools.cache
def peak_flops(device_kind: str, platform: str, dtype: str) -> float:
    """Peak FLOP/s of one device: the published bf16 peak for known TPUs/GPUs, else measured (CPU).

    The measurement is the best of 5 runs of a 1024^3 matmul in `dtype`: on a CPU the useful
    peak is whatever XLA's matmuls reach, not a datasheet number.
    """
    kind = device_kind.lower()
    for key, chip in _DEVICE_CHIPS.items():
        if platform != "cpu" and key in kind:
            return CHIPS[chip].bf16
    a = jnp.ones((1024, 1024), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


class MetricsLog:
    """metrics.jsonl in RUN_DIR. On resume, records past the restored step (from the lost run) are dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
