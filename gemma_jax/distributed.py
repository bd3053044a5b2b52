"""Multi-process start-up: one process per host (TPU pods) or several on one machine (testing).

On a TPU pod `jax.distributed.initialize()` discovers its peers by itself. For local runs,
`launch/local.sh` sets GEMMA_JAX_COORDINATOR / GEMMA_JAX_NUM_PROCESSES / GEMMA_JAX_PROCESS_ID,
and CPU collectives go through gloo. Every process runs the same program on the same inputs;
only process 0 prints and writes.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(force: bool = False) -> None:
    """Join the process group when launched as one of several processes (or when `force`d on a pod)."""
    coordinator = os.environ.get("GEMMA_JAX_COORDINATOR")
    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator,
            num_processes=int(os.environ["GEMMA_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["GEMMA_JAX_PROCESS_ID"]),
        )
    elif force:
        jax.distributed.initialize()  # TPU VMs: peers from the metadata server


def is_leader() -> bool:
    """True on the process that prints and writes (process 0)."""
    return jax.process_index() == 0


def from_leader(values: np.ndarray) -> np.ndarray:
    """Process 0's `values` on every process: decisions that depend on files only the leader may read."""
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.broadcast_one_to_all(values))
