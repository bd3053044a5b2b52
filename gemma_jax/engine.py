"""Continuous batching: a fixed set of decode slots sharing one compiled decode step.

When a sequence finishes, its slot is refilled with the next prompts' prefill (run as a
small batch and scattered into the free slots), so the decode step always runs full. Prefill
batches are bucketed (powers of two in rows and prompt length) to bound recompilation. Each
request samples from its own PRNG stream, derived from the seed and its id, so its output is
the same whatever else shares the batch. The KV cache is one array per layer over all slots,
sharded by the model's layout like every other activation.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Iterable, Iterator

import jax
import numpy as np

from gemma_jax.api import Gemma
from gemma_jax.generate import DecodeState, _decode, _prefill, bucket, sampling_args
from gemma_jax.sampling import Sampler
from sharding import to_host


@dataclasses.dataclass
class Request:
    id: str
    prompt: list[int]
    max_new_tokens: int


@dataclasses.dataclass
class Finished:
    id: str
    tokens: list[int]  # new tokens, stop token excluded
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int


def request_key(seed: int, request_id: str) -> np.ndarray:
    """The PRNG key of one request: a function of the seed and the id only."""
    return np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(request_id.encode())))


class Engine:
    def __init__(
        self,
        model: Gemma,
        *,
        slots: int,
        max_len: int,
        sampler: Sampler,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: tuple[int, ...] = (),
        chunk: int = 8,
    ):
        if max_len > model.config.max_position:
            raise ValueError(f"max_len {max_len} exceeds the model context {model.config.max_position}")
        self.model, self.sampler, self.seed, self.chunk = model, sampler, seed, chunk
        self.slots = slots if model.layout is None else model.batch_rows(slots)
        self.max_len = max_len
        self.sampling = sampling_args(temperature, top_p, stop_ids)
        self.static = dict(config=model.config, dtype=model.compute_dtype, sampler=sampler, layout=model.layout, quant=model.quant)

    def run(self, requests: Iterable[Request]) -> Iterator[Finished]:
        """Serve `requests` in order of arrival; yields each one as it finishes."""
        queue = iter(requests)
        active: list[Request | None] = [None] * self.slots
        emitted: list[list[int]] = [[] for _ in range(self.slots)]
        limits = np.zeros(self.slots, np.int32)
        state = self._prefill([], limits)  # every slot empty (done)
        exhausted = False
        while True:
            free = [i for i, r in enumerate(active) if r is None]
            incoming = [] if exhausted else _take(queue, len(free))
            exhausted = exhausted or len(incoming) < len(free)
            if incoming:
                for slot, request in zip(free, incoming):
                    active[slot], emitted[slot] = request, []
                    limits[slot] = request.max_new_tokens
                targets = np.full(bucket(len(incoming), 1), self.slots, np.int32)  # padding rows: dropped
                targets[: len(incoming)] = free[: len(incoming)]
                state = _insert(state, self._prefill(incoming, limits[targets[: len(incoming)]]), targets)
            if all(r is None for r in active):
                return
            state, out = _decode(self.model.params, state, limits, np.zeros(self.slots, bool), self.sampling,
                                 out_len=self.chunk, **self.static)  # fmt: skip
            out, done, stopped = to_host(out), to_host(state.done), to_host(state.stopped)
            for slot, request in enumerate(active):
                if request is None:
                    continue
                emitted[slot].extend(t for t in out[slot].tolist() if t >= 0)
                if done[slot]:
                    yield Finished(request.id, emitted[slot], "stop" if stopped[slot] else "length", len(request.prompt))
                    active[slot], limits[slot] = None, 0

    def _prefill(self, requests: list[Request], limits: np.ndarray) -> DecodeState:
        """Prefill `requests` as one bucketed batch (or, with none, a batch of empty slots)."""
        rows = bucket(len(requests), 1) if requests else self.slots
        if any(len(r.prompt) + r.max_new_tokens > self.max_len for r in requests):  # true lengths: padding takes no slot
            raise ValueError(f"a request needs more than max_len={self.max_len} cache slots")
        length = min(bucket(max((len(r.prompt) for r in requests), default=1)), self.max_len)
        tokens = np.zeros((rows, length), np.int32)
        lengths, row_limits = np.ones(rows, np.int32), np.zeros(rows, np.int32)
        keys = np.zeros((rows, 2), np.uint32)
        for i, r in enumerate(requests):
            tokens[i, : len(r.prompt)], lengths[i], row_limits[i] = r.prompt, len(r.prompt), limits[i]
            keys[i] = request_key(self.seed, r.id)
        return _prefill(self.model.params, tokens, lengths, keys, row_limits, self.sampling, cache_len=self.max_len, **self.static)


def _take(queue: Iterator[Request], n: int) -> list[Request]:
    out: list[Request] = []
    if n == 0:
        return out
    for request in queue:
        out.append(request)
        if len(out) == n:
            break
    return out


@functools.partial(jax.jit, donate_argnames=("state",))
def _insert(state: DecodeState, new: DecodeState, slots: jax.Array) -> DecodeState:
    """Scatter row i of `new` into row slots[i] of `state` (out-of-range slots are dropped)."""
    return jax.tree.map(lambda old, fresh: old.at[slots].set(fresh, mode="drop"), state, new)
