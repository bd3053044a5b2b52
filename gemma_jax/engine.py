"""Continuous batching: a fixed set of decode slots sharing one compiled decode step.

When a sequence finishes, its slot is refilled with the next prompts' prefill (run as a
small batch and scattered into the free slots), so the decode step always runs full. Prefill
batches are bucketed (powers of two in rows and prompt length) to bound recompilation. Each
request samples from its own PRNG stream (its own key, or one derived from the seed and its
id), so its output is the same whatever else shares the batch. Sampling settings are traced
per-row arrays, so requests with different settings share one compiled step (with a
`RowSampler`). The KV cache is one array per layer over all slots, sharded by the model's
layout like every other activation.

`run` serves a fixed list of requests (batch jobs); a server drives `admit` / `step` /
`release` itself, between steps, as requests arrive and leave. Every call is deterministic
given the same calls, so on a multi-host mesh each process runs the same sequence of calls.
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
from gemma_jax.sampling import RowSampler, Sampler
from gemma_jax.sharding import to_host


@dataclasses.dataclass
class Request:
    id: str
    prompt: list[int]
    max_new_tokens: int
    temperature: float | None = None  # None: the engine's; with a RowSampler, 0 is greedy
    top_p: float | None = None  # None: the engine's
    top_k: int = 0  # RowSampler only; 0: all tokens
    key: np.ndarray | None = None  # uint32 [2] PRNG key; None: request_key(engine seed, id)


@dataclasses.dataclass
class Finished:
    id: str
    tokens: list[int]  # new tokens, stop token excluded
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int


@dataclasses.dataclass
class Output:
    """What one step produced for one active request."""

    request: Request
    tokens: list[int]  # new tokens (stop token excluded)
    finish_reason: str | None  # "stop" / "length" when the request finished in this step (its slot is free)


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
        sampler: Sampler | RowSampler,
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
        self.defaults = dict(temperature=temperature, top_p=top_p)
        self.stop_ids = sampling_args(temperature, top_p, stop_ids)["stop_ids"]
        self.static = dict(runtime=model.runtime, sampler=sampler)
        self.reset()

    def reset(self) -> None:
        """Empty every slot (also the way back to a usable state after a failed step)."""
        self.active: list[Request | None] = [None] * self.slots
        self.limits = np.zeros(self.slots, np.int32)
        self.settings = self._settings([], self.slots)
        self.state = self._prefill([])  # every slot empty (done)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.active)

    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.active) if r is None]

    def admit(self, requests: list[Request]) -> list[int]:
        """Prefill `requests` into the lowest free slots (at most as many as are free); returns their slots."""
        free = self.free_slots()
        if len(requests) > len(free):
            raise ValueError(f"{len(requests)} requests for {len(free)} free slots")
        if not requests:
            return []
        slots = free[: len(requests)]
        new = self._prefill(requests)
        targets = np.full(bucket(len(requests), 1), self.slots, np.int32)  # padding rows: dropped
        targets[: len(requests)] = slots
        self.state = _insert(self.state, new, targets)
        for slot, request in zip(slots, requests):
            self.active[slot], self.limits[slot] = request, request.max_new_tokens
        fresh = self._settings(requests, len(requests))
        for name, values in self.settings.items():
            values[slots] = fresh[name][: len(requests)]
        return slots

    def release(self, slot: int) -> None:
        """Free a slot now (the request was cancelled or stopped by the host): it stops decoding at the next step."""
        self.active[slot], self.limits[slot] = None, 0

    def step(self) -> list[Output]:
        """Decode up to `chunk` tokens for every active slot; finished requests leave their slots."""
        sampling = {**self.settings, "stop_ids": self.stop_ids}
        self.state, out = _decode(self.model.params, self.state, self.limits, np.zeros(self.slots, bool), sampling,
                                  out_len=self.chunk, **self.static)  # fmt: skip
        out, done, stopped = to_host(out), to_host(self.state.done), to_host(self.state.stopped)
        outputs = []
        for slot, request in enumerate(self.active):
            if request is None:
                continue
            reason = ("stop" if stopped[slot] else "length") if done[slot] else None
            outputs.append(Output(request, [t for t in out[slot].tolist() if t >= 0], reason))
            if reason is not None:
                self.release(slot)
        return outputs

    def run(self, requests: Iterable[Request]) -> Iterator[Finished]:
        """Serve `requests` in order of arrival; yields each one as it finishes."""
        queue = iter(requests)
        emitted: dict[str, list[int]] = {}
        while True:
            self.admit(_take(queue, len(self.free_slots())))
            if not self.running:
                return
            for out in self.step():
                tokens = emitted.setdefault(out.request.id, [])
                tokens.extend(out.tokens)
                if out.finish_reason is not None:
                    del emitted[out.request.id]
                    yield Finished(out.request.id, tokens, out.finish_reason, len(out.request.prompt))

    def _settings(self, requests: list[Request], rows: int) -> dict[str, np.ndarray]:
        """Per-row traced sampling settings of `requests`, padded to `rows` with the engine's defaults."""
        requests = list(requests) + [None] * (rows - len(requests))
        pick = lambda r, name: self.defaults[name] if r is None or getattr(r, name) is None else getattr(r, name)
        return dict(
            temperature=np.array([pick(r, "temperature") for r in requests], np.float32),
            top_p=np.array([pick(r, "top_p") for r in requests], np.float32),
            top_k=np.array([0 if r is None else r.top_k for r in requests], np.int32),
        )

    def _prefill(self, requests: list[Request]) -> DecodeState:
        """Prefill `requests` as one bucketed batch (or, with none, a batch of empty slots)."""
        rows = bucket(len(requests), 1) if requests else self.slots
        for r in requests:
            if len(r.prompt) + r.max_new_tokens > self.max_len:
                raise ValueError(f"request {r.id!r} needs {len(r.prompt) + r.max_new_tokens} cache slots, more than max_len={self.max_len}")
        length = min(bucket(max((len(r.prompt) for r in requests), default=1)), self.max_len)
        tokens = np.zeros((rows, length), np.int32)
        lengths, limits = np.ones(rows, np.int32), np.zeros(rows, np.int32)
        keys = np.zeros((rows, 2), np.uint32)
        for i, r in enumerate(requests):
            tokens[i, : len(r.prompt)], lengths[i], limits[i] = r.prompt, len(r.prompt), r.max_new_tokens
            keys[i] = request_key(self.seed, r.id) if r.key is None else r.key
        sampling = {**self._settings(requests, rows), "stop_ids": self.stop_ids}
        return _prefill(self.model.params, tokens, lengths, keys, limits, sampling, cache_len=self.max_len, **self.static)


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
