"""Continuous batching: a fixed set of decode slots sharing one compiled decode step.

When a sequence finishes, its slot is refilled with the next prompts' prefill (run as a
small batch and scattered into the free slots), so the decode step always runs full. Prefill
batches are bucketed (powers of two in rows and prompt length) to bound recompilation. Each
request samples from its own PRNG stream (its own key, or one derived from the seed and its
id), so its output is the same whatever else shares the batch. Sampling settings are traced
per-row arrays, so requests with different settings share one compiled step (with a
`RowSampler`).

The KV cache is paged (models/kv_cache.py): per layer one pool of `page_size`-token pages shared by
every slot, and a page table per slot. A request is admitted when a slot is free and the pool has
pages for its prompt and its `max_new_tokens` (global layers: every block of it; sliding-window
layers: at most their ring), and its pages return to the pool when it ends, so short and long
requests share memory: `kv_tokens` (the global layers' pool, in tokens) is the memory budget and
`slots` only the decode batch. Prompts are prefilled into a small dense cache and copied into their
pages; decode steps read only the pages rows have filled. Page ids are handed out lowest first, so
the same calls give the same tables on every process.

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
import jax.numpy as jnp
import numpy as np

from gemma_jax.api import Gemma
from gemma_jax.generate import DecodeState, _decode, _pin, _prefill, bucket, sampling_args
from gemma_jax.models.kv_cache import paged_cache, pool_pages, table_width, write_pages
from gemma_jax.runtime import Runtime
from gemma_jax.sampling import RowSampler, Sampler
from gemma_jax.sharding import to_host


PREFILL_TOKENS = 8192  # padded prompt tokens per prefill batch


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
    slot: int
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
        page_size: int = 32,
        kv_tokens: int | None = None,
    ):
        if max_len > model.config.max_position:
            raise ValueError(f"max_len {max_len} exceeds the model context {model.config.max_position}")
        kv_tokens = slots * max_len if kv_tokens is None else kv_tokens
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        if kv_tokens < max_len:
            raise ValueError(f"kv_tokens ({kv_tokens}) must hold at least one sequence of max_len ({max_len}) tokens")
        self.model, self.sampler, self.seed, self.chunk = model, sampler, seed, chunk
        self.slots = slots if model.layout is None else model.batch_rows(slots)
        self.max_len, self.page_size, self.kv_tokens = max_len, page_size, kv_tokens
        self.defaults = dict(temperature=temperature, top_p=top_p)
        self.stop_ids = sampling_args(temperature, top_p, stop_ids)["stop_ids"]
        self.static = dict(runtime=model.runtime, sampler=sampler)
        dense = jax.eval_shape(lambda: model.runtime.init_cache(1, max_len))
        self.widths = {name: table_width(layer["k"].shape[-2], max_len, page_size) for name, layer in dense.items()}
        self.capacity = {w: pool_pages(w, max_len, page_size, kv_tokens, self.slots) for w in set(self.widths.values())}
        self.reset()

    def reset(self) -> None:
        """Empty every slot and return every page (also the way back to a usable state after a failed step)."""
        self.active: list[Request | None] = [None] * self.slots
        self.limits = np.zeros(self.slots, np.int32)
        self.settings = self._settings([], self.slots)
        self.free_pages = {w: list(range(1, n)) for w, n in self.capacity.items()}  # lowest first
        self.tables = {w: np.zeros((self.slots, w), np.int32) for w in self.capacity}
        capacity = tuple(sorted(self.capacity.items()))
        self.state = _empty_state(self.slots, self.max_len, self.page_size, capacity, runtime=self.model.runtime)
        self._tables_changed = True

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.active)

    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.active) if r is None]

    def pages_needed(self, request: Request) -> dict[int, int]:
        """Pages `request` holds per table width: its prompt and completion's blocks, at most a ring's."""
        tokens = len(request.prompt) + request.max_new_tokens
        if tokens > self.max_len:
            raise ValueError(f"request {request.id!r} needs {tokens} cache slots, more than max_len={self.max_len}")
        return {w: min(w, -(-tokens // self.page_size)) for w in self.capacity}

    def fit(self, requests: list[Request], releasing: Iterable[int] = ()) -> int:
        """How many of `requests`, in order, can be admitted now (after `releasing` slots are freed)."""
        releasing = {slot for slot in releasing if self.active[slot] is not None}
        slots = len(self.free_slots()) + len(releasing)
        free = {w: len(pages) + sum(int(np.count_nonzero(self.tables[w][s])) for s in releasing) for w, pages in self.free_pages.items()}
        for n, request in enumerate(requests):
            need = self.pages_needed(request)
            if n == slots or any(need[w] > free[w] for w in free):
                return n
            free = {w: free[w] - need[w] for w in free}
        return len(requests)

    def admit(self, requests: list[Request]) -> list[Output]:
        """Prefill `requests` into the lowest free slots, with their pages; returns each one's first token
        (the prefill samples it), in order. A request that ends there (a stop token, one new token) leaves its slot."""
        if self.fit(requests) < len(requests):
            raise ValueError(f"{len(requests)} requests do not fit {len(self.free_slots())} free slots and the free pages")
        if not requests:
            return []
        slots = self.free_slots()[: len(requests)]
        for slot, request in zip(slots, requests):
            for w, n in self.pages_needed(request).items():
                self.tables[w][slot, :n], self.free_pages[w] = self.free_pages[w][:n], self.free_pages[w][n:]
        self._tables_changed = True
        self._push_tables()
        for slot, request in zip(slots, requests):
            self.active[slot], self.limits[slot] = request, request.max_new_tokens
        fresh = self._settings(requests, len(requests))
        for name, values in self.settings.items():
            values[slots] = fresh[name][: len(requests)]
        firsts: list[np.ndarray] = [np.empty(0, np.int32)] * len(requests)  # each filled by its prefill group
        for group in _prefill_groups(requests):
            new, out = self._prefill([requests[i] for i in group])
            targets = np.full(bucket(len(group), 1), self.slots, np.int32)  # padding rows: dropped
            targets[: len(group)] = [slots[i] for i in group]
            self.state = _insert(self.state, new, targets, runtime=self.model.runtime)
            out = to_host(out)
            for row, i in enumerate(group):
                firsts[i] = out[row]
        return self._outputs(slots, firsts)

    def _outputs(self, slots: list[int], tokens: list[np.ndarray]) -> list[Output]:
        """What `slots` emitted (`tokens` each, -1: nothing); the requests that finished leave their slots."""
        done, stopped = to_host(self.state.done), to_host(self.state.stopped)
        outputs = []
        for slot, emitted in zip(slots, tokens):
            reason = ("stop" if stopped[slot] else "length") if done[slot] else None
            outputs.append(Output(self.active[slot], slot, [t for t in emitted.tolist() if t >= 0], reason))
            if reason is not None:
                self.release(slot)
        return outputs

    def release(self, slot: int) -> None:
        """Free a slot and its pages now (the request ended, was cancelled or stopped by the host)."""
        self.active[slot], self.limits[slot] = None, 0
        for w, table in self.tables.items():
            self.free_pages[w] = sorted(self.free_pages[w] + [int(p) for p in table[slot] if p])
            table[slot] = 0
        self._tables_changed = True

    def _push_tables(self) -> None:
        """Hand the host's page tables to the cache if they changed (a few small arrays; the pools are untouched)."""
        if not self._tables_changed:
            return
        self._tables_changed = False
        cache = {name: layer | {"pages": np.broadcast_to(self.tables[self.widths[name]], layer["pages"].shape)}
                 for name, layer in self.state.cache.items()}  # fmt: skip  (a scanned model's stacked layers: a copy each)
        self.state = _pin_state(self.state._replace(cache=cache), runtime=self.model.runtime)

    def step(self) -> list[Output]:
        """Decode up to `chunk` tokens for every active slot; finished requests leave their slots."""
        sampling = {**self.settings, "stop_ids": self.stop_ids}
        self._push_tables()  # released slots write to the null page from now on
        self.state, out = _decode(self.model.params, self.state, self.limits, np.zeros(self.slots, bool), sampling,
                                  out_len=self.chunk, **self.static)  # fmt: skip
        out = to_host(out)
        active = [slot for slot, request in enumerate(self.active) if request is not None]
        return self._outputs(active, [out[slot] for slot in active])

    def run(self, requests: Iterable[Request]) -> Iterator[Finished]:
        """Serve `requests` in order of arrival; yields each one as it finishes."""
        queue, waiting = iter(requests), []
        emitted: dict[str, list[int]] = {}
        while True:
            waiting.extend(_take(queue, max(0, len(self.free_slots()) - len(waiting))))
            admitted = self.fit(waiting)
            outputs = self.admit(waiting[:admitted])
            del waiting[:admitted]
            if not outputs and not self.running:
                return
            for out in outputs + (self.step() if self.running else []):
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

    def _prefill(self, requests: list[Request]) -> tuple[DecodeState, jax.Array]:
        """Prefill `requests` as one bucketed batch into a dense cache of their length (and their first tokens)."""
        rows = bucket(len(requests), 1)
        length = min(bucket(max(len(r.prompt) for r in requests)), self.max_len)
        tokens = np.zeros((rows, length), np.int32)
        lengths, limits = np.ones(rows, np.int32), np.zeros(rows, np.int32)
        keys = np.zeros((rows, 2), np.uint32)
        for i, r in enumerate(requests):
            tokens[i, : len(r.prompt)], lengths[i], limits[i] = r.prompt, len(r.prompt), r.max_new_tokens
            keys[i] = request_key(self.seed, r.id) if r.key is None else r.key
        sampling = {**self._settings(requests, rows), "stop_ids": self.stop_ids}
        return _prefill(self.model.params, tokens, lengths, keys, limits, sampling, cache_len=length, **self.static)


def _prefill_groups(requests: list[Request]) -> list[list[int]]:
    """Indices of `requests` prefilled together: same prompt-length bucket, at most `PREFILL_TOKENS` padded
    tokens per batch (one row at least), so that short prompts are not padded to a long one's length and a
    burst of long ones does not prefill in one huge batch."""
    groups: dict[int, list[list[int]]] = {}
    for i, request in enumerate(requests):
        length = bucket(len(request.prompt))
        rows = groups.setdefault(length, [[]])
        if len(rows[-1]) * length >= max(PREFILL_TOKENS, length):
            rows.append([])
        rows[-1].append(i)
    return [group for rows in groups.values() for group in rows]


def _take(queue: Iterator[Request], n: int) -> list[Request]:
    out: list[Request] = []
    if n == 0:
        return out
    for request in queue:
        out.append(request)
        if len(out) == n:
            break
    return out


@functools.partial(jax.jit, static_argnames=("slots", "max_len", "page_size", "capacity", "runtime"))
def _empty_state(slots: int, max_len: int, page_size: int, capacity: tuple, runtime: Runtime) -> DecodeState:
    """Every slot empty (done), over a paged cache whose layers with tables `w` wide have `dict(capacity)[w]` pages."""
    dense = jax.eval_shape(lambda: runtime.init_cache(1, max_len))
    cache = paged_cache(dense, max_len, page_size, dict(capacity), slots, runtime.layout)
    zeros = jnp.zeros(slots, jnp.int32)
    return _pin(runtime, DecodeState(cache, zeros, zeros, zeros, jnp.ones(slots, bool), jnp.zeros(slots, bool),
                                     jnp.zeros((slots, 2), jnp.uint32)))  # fmt: skip


@functools.partial(jax.jit, static_argnames=("runtime",), donate_argnames=("state",))
def _pin_state(state: DecodeState, runtime: Runtime) -> DecodeState:
    """The state laid out as `_decode` expects it (new host tables placed like the rest of the cache)."""
    return _pin(runtime, state)


@functools.partial(jax.jit, static_argnames=("runtime",), donate_argnames=("state",))
def _insert(state: DecodeState, new: DecodeState, slots: jax.Array, runtime: Runtime) -> DecodeState:
    """Row i of `new` becomes row slots[i] of `state` (out-of-range slots are dropped): its dense prefill
    cache is copied into the pages the row's tables already name."""
    rows = lambda old, fresh: old.at[slots].set(fresh, mode="drop")
    fields = jax.tree.map(rows, state._replace(cache=None), new._replace(cache=None))
    cache = {}
    for name, layer in state.cache.items():
        copy = _copy_into_pages
        for _ in range(layer["kv"].ndim - 4):  # a scanned model's stacked layers
            copy = jax.vmap(copy, in_axes=(0, 0, None))
        cache[name] = copy(layer, new.cache[name], slots)
    return _pin(runtime, fields._replace(cache=cache))


def _copy_into_pages(layer: dict, dense: dict, slots: jax.Array) -> dict:
    """One layer: the dense prefill cache's entries (rows i) written into the pages of rows slots[i]."""
    table = layer["pages"].at[slots].get(mode="fill", fill_value=0)  # padding rows: the null page
    kv = jnp.stack([dense["k"].swapaxes(1, 2), dense["v"].transpose(0, 3, 1, 2)], axis=3)  # b S K 2 H
    kv = kv.reshape(*kv.shape[:2], -1, kv.shape[-1])  # b S 2K H, heads interleaved
    scale = None
    if "k_scale" in dense:
        scale = jnp.stack([dense["k_scale"], dense["v_scale"]], axis=-1).swapaxes(1, 2).reshape(*kv.shape[:3])
    return write_pages(layer, table, kv, scale, dense["pos"])
