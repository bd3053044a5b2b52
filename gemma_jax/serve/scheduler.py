"""The engine thread: continuous batching for requests that arrive over time.

HTTP handlers `submit` jobs (one per completion choice) into a bounded queue and read their
text from an asyncio queue. One thread owns the `Engine`: between steps it drops cancelled
jobs, frees the slots of jobs that were cancelled or hit a stop string, admits queued jobs
into free slots, then runs one step (a few decode steps for every slot) and streams each
job's new text. While nothing runs it sleeps until a job arrives.

On a multi-host mesh every process must make the same engine calls: process 0 (the only one
serving HTTP) decides each round's plan (slots to free, requests to admit, shut down) and
broadcasts it; the other processes `follow` it. An idle leader broadcasts an empty plan every
`HEARTBEAT` seconds, so followers never wait in a collective for long.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from typing import Callable

import jax
import numpy as np

from gemma_jax.text_stream import TextWatcher, until_stop
from gemma_jax.distributed import from_leader
from gemma_jax.engine import Engine, Output, Request
from gemma_jax.generate import bucket
from gemma_jax.serve.metrics import Metrics
from gemma_jax.tokenizer import Tokenizer

HEARTBEAT = 1.0  # seconds an idle leader waits before broadcasting an empty plan


class QueueFull(Exception):
    """More jobs are waiting for a slot than the queue admits."""


class ShuttingDown(Exception):
    """The server stopped accepting work."""


@dataclasses.dataclass
class Event:
    """What a job sends to its HTTP handler: new text, and on the last event why it finished."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", or "error" (then `error` says why)
    completion_tokens: int = 0
    error: str | None = None


class Job:
    """One completion choice of one HTTP request, from submission to its last event."""

    def __init__(self, request: Request, tokenizer: Tokenizer, stop: tuple[str, ...], emit: Callable[[Event], None]):
        self.request, self.stop, self.emit = request, stop, emit
        self.watcher = TextWatcher(tokenizer, 1, stop, lambda _, text: emit(Event(text=text)))
        self.tokenizer = tokenizer
        self.tokens = 0
        self.submitted = time.perf_counter()
        self.first_token: float | None = None
        self.slot: int | None = None
        self.cancelled = False  # set by the HTTP side (client gone); the engine thread frees the slot
        self.finished = False

    def feed(self, tokens: list[int]) -> bool:
        """Stream `tokens`' text; True when a stop string appeared (tokens after it are not counted)."""
        if not self.stop:
            self.tokens += len(tokens)
            self.watcher(np.asarray([tokens]))
            return False
        for token in tokens:  # one at a time: usage counts tokens up to the one completing the stop string
            self.tokens += 1
            if self.watcher(np.asarray([[token]]))[0]:
                return True
        return False

    def finish(self, reason: str) -> None:
        self.finished = True
        self.watcher.finish([until_stop(self.tokenizer, self.watcher.ids[0], self.stop)[0]])
        self.emit(Event(finish_reason=reason, completion_tokens=self.tokens))

    def fail(self, message: str) -> None:
        self.finished = True
        self.emit(Event(finish_reason="error", completion_tokens=self.tokens, error=message))


@dataclasses.dataclass
class Plan:
    """One round's decisions, identical on every process."""

    release: list[int]  # slots to free
    admit: list[Request]
    closing: bool = False


class Scheduler:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, max_queue: int, metrics: Metrics | None = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine, self.tokenizer, self.max_queue = engine, tokenizer, max_queue
        self.metrics = metrics or Metrics()
        self.metrics.watch(queued=lambda: len(self._pending), running=lambda: engine.running)
        self._pending: collections.deque[Job] = collections.deque()
        self._running: dict[str, Job] = {}  # admitted jobs by request id (until their slot is freed)
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # why the engine thread stopped, if it died

    # -- HTTP side (event loop thread) ---------------------------------------------------
    def job(self, request: Request, stop: tuple[str, ...], emit: Callable[[Event], None]) -> Job:
        return Job(request, self.tokenizer, stop, emit)

    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs` (all or none): QueueFull past the limit, ShuttingDown once closing."""
        with self._cond:
            if self._closing or self.failure is not None:
                raise ShuttingDown("the server is shutting down" if self.failure is None else f"the engine failed: {self.failure}")
            if len(self._pending) + len(jobs) > self.max_queue + len(self.engine.free_slots()):
                raise QueueFull(f"{len(self._pending)} requests are waiting for a slot (limit {self.max_queue}); retry later")
            self._pending.extend(jobs)
            self._cond.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """The client is gone: drop these jobs (queued ones at once, running ones free their slot at the next step)."""
        with self._cond:
            for job in jobs:
                job.cancelled = not job.finished
            self._cond.notify()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle ---------------------------------------------------------------------
    def warm_up(self) -> None:
        """Compile the decode step and the prefill of every batch bucket (short prompts) before serving.

        Otherwise the first burst of each size compiles while every running stream waits. Every
        process of a mesh runs it.
        """
        rows = 1
        while True:
            count = min(rows, self.engine.slots)
            requests = [Request(f"warm-up-{i}", [self.tokenizer.bos_id], 1, temperature=0.0) for i in range(count)]
            self.engine.admit(requests[: self.engine.fit(requests)])  # a small KV budget may hold fewer
            while self.engine.running:
                self.engine.step()
            if count == self.engine.slots:
                return
            rows *= 2

    def start(self) -> None:
        self._thread = threading.Thread(target=self._lead, name="gemma-jax-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the engine thread: jobs still queued or running end with an error event."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- engine thread -------------------------------------------------------------------
    def _lead(self) -> None:
        try:
            while True:
                plan = self._share(self._next_plan())
                self._deliver(self._apply(plan))
                if plan.closing:
                    return
                if self.engine.running:
                    self._deliver(self._step())
        except Exception as err:  # noqa: BLE001 - reported on /health; the HTTP side keeps answering
            self.failure = f"{type(err).__name__}: {err}"
            traceback.print_exc()
            with self._cond:
                for job in [*self._pending, *self._running.values()]:
                    job.fail(self.failure)
                self._pending.clear()
                self._running.clear()

    def _step(self) -> list[Output]:
        """One engine step; a failed step fails the running jobs and empties the slots, and serving goes on."""
        try:
            return self.engine.step()
        except Exception as err:  # noqa: BLE001 - e.g. device out of memory: the next requests may fit
            traceback.print_exc()
            for job in self._running.values():
                job.fail(f"generation failed: {type(err).__name__}: {err}")
            self._running.clear()
            self.engine.reset()
            return []

    def _next_plan(self) -> Plan:
        with self._cond:
            if not self.engine.running and not self._pending and not self._closing:
                self._cond.wait(HEARTBEAT)
            for job in [j for j in self._pending if j.cancelled]:
                self._pending.remove(job)
                self.metrics.finished.labels("cancelled").inc()
            gone = [job for job in self._running.values() if job.cancelled or job.finished]
            for job in gone:
                del self._running[job.request.id]
                if job.cancelled:
                    self.metrics.finished.labels("cancelled").inc()
            if self._closing:
                for job in [*self._pending, *self._running.values()]:
                    job.fail("the server shut down before this request finished")
                self._pending.clear()
                self._running.clear()
                return Plan([j.slot for j in gone], [], closing=True)
            room = self.engine.fit([job.request for job in self._pending], releasing=[j.slot for j in gone])
            admitted = [self._pending.popleft() for _ in range(room)]
        for job in admitted:
            self._running[job.request.id] = job
        return Plan([j.slot for j in gone], [j.request for j in admitted])

    def _apply(self, plan: Plan) -> list[Output]:
        """Release and admit as planned; returns the admitted requests' first tokens (their prefill sampled them)."""
        for slot in plan.release:
            self.engine.release(slot)
        outputs = self.engine.admit(plan.admit)
        for out in outputs:
            if out.request.id in self._running:
                self._running[out.request.id].slot = out.slot
        return outputs

    def _deliver(self, outputs: list[Output]) -> None:
        now, total = time.perf_counter(), 0
        for out in outputs:
            job = self._running.get(out.request.id)
            if job is None or job.cancelled or job.finished:
                continue  # its slot is freed in the next plan
            if job.first_token is None and out.tokens:
                job.first_token = now
                self.metrics.time_to_first_token.observe(now - job.submitted)
            before = job.tokens
            hit_stop = job.feed(out.tokens)
            total += job.tokens - before
            if hit_stop or out.finish_reason is not None:
                reason = "stop" if hit_stop else out.finish_reason
                job.finish(reason)
                self.metrics.finished.labels(reason).inc()
                if out.finish_reason is not None:  # the engine already freed the slot
                    del self._running[out.request.id]
        self.metrics.generated(total)

    # -- multi-host ----------------------------------------------------------------------
    def follow(self) -> None:
        """Processes other than 0: make the leader's engine calls until it shuts down."""
        self.warm_up()
        while True:
            plan = self._share(None)
            self._apply(plan)
            if plan.closing:
                return
            if self.engine.running:
                self.engine.step()

    def _share(self, plan: Plan | None) -> Plan:
        """Process 0's plan on every process (the plan itself with one process)."""
        if jax.process_count() == 1:
            return plan
        slots = self.engine.slots
        control = np.zeros(3 + slots, np.int32)  # closing, admissions, prompt width, then a release flag per slot
        if plan is not None:
            width = bucket(max((len(r.prompt) for r in plan.admit), default=1), 1)
            control[:3] = plan.closing, len(plan.admit), width
            control[3 + np.asarray(plan.release, int)] = 1
        control = from_leader(control)
        closing, count, width = (int(v) for v in control[:3])
        release = np.flatnonzero(control[3:]).tolist()
        if not count:
            return Plan(release, [], bool(closing))
        # one int32 row per admission: prompt length, max_new_tokens, top_k, key (2), temperature, top_p, prompt
        rows = np.zeros((slots, 7 + width), np.int32)
        if plan is not None:
            for row, r in zip(rows, plan.admit):
                row[:3] = len(r.prompt), r.max_new_tokens, r.top_k
                row[3:5] = np.asarray(r.key, np.uint32).view(np.int32)
                row[5:7] = np.asarray([r.temperature, r.top_p], np.float32).view(np.int32)
                row[7 : 7 + len(r.prompt)] = r.prompt
        rows = from_leader(rows)
        if plan is not None:
            return plan
        admit = [
            Request(f"follow-{i}", row[7 : 7 + row[0]].tolist(), int(row[1]), top_k=int(row[2]), key=row[3:5].view(np.uint32),
                    temperature=float(row[5:6].view(np.float32)[0]), top_p=float(row[6:7].view(np.float32)[0]))  # fmt: skip
            for i, row in enumerate(rows[:count])
        ]
        return Plan(release, admit, bool(closing))
