"""Multi-process start-up: one process per host (TPU pods) or several on one machine (testing).

On a TPU pod `jax.distributed.initialize()` discovers its peers by itself. For local runs,
`launch/local.sh` sets GEMMA_JAX_COORDINATOR / GEMMA_JAX_NUM_PROCESSES / GEMMA_JAX_PROCESS_ID,
and CPU collectives go through gloo. Every process runs the same program on the same inputs;
only process 0 prints and writes.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(force: bool = False) -> None:
    """Join the process group when launched as one of several processes (or when `force`d on a pod)."""
    coordinator = os.environ.get("GEMMA_JAX_COORDINATOR")
    if coordinator:
        _native_stdout_to_stderr()
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator,
            num_processes=int(os.environ["GEMMA_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["GEMMA_JAX_PROCESS_ID"]),
        )
    elif force:
        jax.distributed.initialize()  # TPU VMs: peers from the metadata server


def _native_stdout_to_stderr() -> None:
    """Keep stdout for what we print: gloo writes "[Gloo] Rank 0 is connected to ..." lines to the C++
    stdout (file descriptor 1) whenever it builds a communicator, so fd 1 becomes stderr and Python's
    `sys.stdout` moves to a duplicate of the original stdout."""
    sys.stdout.flush()
    ours = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    old = sys.stdout
    sys.stdout = open(ours, "w", encoding=old.encoding, errors=old.errors)
    sys.stdout.reconfigure(line_buffering=old.line_buffering, write_through=old.write_through)


def is_leader() -> bool:
    """True on the process that prints and writes (process 0)."""
    return jax.process_index() == 0


def from_leader(values: np.ndarray) -> np.ndarray:
    """Process 0's `values` on every process: decisions that depend on files only the leader may read."""
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def text_from_leader(text: str) -> str:
    """Process 0's `text` on every process: input only the leader reads (a prompt from the terminal's stdin)."""
    if jax.process_count() == 1:
        return text
    data = np.frombuffer(text.encode(), np.uint8)
    size = int(from_leader(np.array([data.size], np.int64))[0])
    padded = np.zeros(size, np.uint8)
    padded[: min(size, data.size)] = data[:size]
    return from_leader(padded).tobytes().decode()
