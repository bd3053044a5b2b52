"""Per-device memory of a fine-tuning run, estimated before any weight is loaded or step compiled.

A run that does not fit should fail in a second with the numbers, not after minutes of loading
and compiling with XLA's RESOURCE_EXHAUSTED. The states are counted exactly: the step's own
abstract train state (trained params, AdamW moments) and frozen LoRA base, each leaf at the
shape of its shard. Activations reuse `gemma_jax.plan`'s model of one layer's forward peak
(the one `gemma-jax plan` reports), kept for every layer unless `remat=block` keeps only the
layers' inputs, plus the logits with their float32 softmax and gradient, and one layer's
weights as FSDP gathers them. XLA's fusions and buffer reuse move the real peak, so this
rules runs out rather than promising that one fits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from gemma_jax.kernels.attention import splash_applies
from gemma_jax.plan import GATHERED_AXES, GiB, device_param_bytes, local_shape, prefill_peak
from gemma_jax.train.step import StepSpec


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device."""

    params: int  # trained: the whole model, or the LoRA factors
    gradients: int  # the float32 sum over micro-batches and one micro-batch's gradients
    optimizer: int  # AdamW moments
    frozen: int  # LoRA: the frozen base
    activations: int  # kept for the backward pass, plus the logits and one gathered layer

    @property
    def total(self) -> int:
        return self.params + self.gradients + self.optimizer + self.frozen + self.activations

    def breakdown(self) -> str:
        """"params 1.00 + gradients 2.00 + ... = 5.00 GiB" (parts that are zero left out)."""
        parts = {"params": self.params, "gradients": self.gradients, "optimizer": self.optimizer,
                 "frozen base": self.frozen, "activations": self.activations}  # fmt: skip
        shown = " + ".join(f"{name} {_size(n)}" for name, n in parts.items() if n)
        return f"{shown} = {_size(self.total)}"

    def describe(self, limit: int | None) -> str:
        """One line for the run's log: the breakdown against the device's memory, where it is known."""
        of = f" of {_size(limit)}" if limit else " (device memory unknown: not checked)"
        return f"memory per device (estimate): {self.breakdown()}{of}"


def estimate_memory(spec: StepSpec) -> MemoryEstimate:
    """The per-device memory of the run `spec` describes (abstract: nothing is allocated)."""
    trained, shardings = spec.abstract_trained(), spec.state_shardings()
    params = _bytes(trained, shardings["params"])
    elements = _bytes(trained, shardings["params"], itemsize=1)
    optimizer = _bytes(jax.eval_shape(spec.optimizer().init, trained), shardings["opt_state"])
    frozen = _bytes(spec.abstract_frozen(), spec.frozen_shardings()) if spec.lora is not None else 0
    return MemoryEstimate(params, 4 * elements + params, optimizer, frozen, _activations(spec))


def _activations(spec: StepSpec) -> int:
    config, layout, c = spec.config, spec.layout, np.dtype(spec.compute_dtype).itemsize
    B, T = spec.micro_batch, spec.seq_len
    layer, _ = prefill_peak(config, layout, B, T, c, splash_applies(T, spec.runtime.kernels))
    rows, vocab = local_shape(layout, ("act_batch", "act_vocab"), (B, config.vocab_size))
    kept = rows * T * config.embed_dim * c if spec.remat == "block" else layer
    logits = rows * T * vocab * (c + 4 + 4)  # the logits, their float32 log-softmax and its gradient
    weights, _ = device_param_bytes(config, layout, np.dtype(spec.compute_dtype), spec.quant, skip=GATHERED_AXES)
    return config.num_layers * kept + layer + logits + weights // config.num_layers


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / 2**20:.1f} MiB"


def _bytes(tree: Any, shardings: Any, itemsize: int | None = None) -> int:
    """Bytes of one device's shards of an abstract tree placed on `shardings` (elements at `itemsize` if given)."""
    leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
    return sum(math.prod(s.shard_shape(x.shape)) * (itemsize or np.dtype(x.dtype).itemsize) for x, s in leaves)


def device_memory(device: jax.Device) -> int | None:
    """Bytes one device may allocate (`memory_stats()["bytes_limit"]` on TPU/GPU), or None where JAX does not say (CPU)."""
    stats = device.memory_stats()
    return None if not stats else stats.get("bytes_limit")


def check_fits(memory: MemoryEstimate, limit: int | None, device_kind: str) -> None:
    """Refuse a run whose estimate exceeds the device's memory, with what to change."""
    if limit is not None and memory.total > limit:
        raise ValueError(
            f"the run needs about {_size(memory.total)} per device, more than the {_size(limit)} of a "
            f"{device_kind} ({memory.breakdown()}): lower batch_size or seq_len, "
            "raise grad_accum, set remat=block, train LoRA (--lora-rank), or shard over more devices (--mesh)"
        )
