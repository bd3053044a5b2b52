"""Prometheus metrics of one server: requests, queue, slots, tokens/s, time to first token.

Each server has its own registry (several servers in one process, as in tests, do not clash).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RATE_WINDOW = 10.0  # seconds over which tokens/s is averaged
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        kw = dict(registry=self.registry)
        self.requests = Counter("gemma_jax_http_requests", "HTTP requests by route and status code", ["route", "status"], **kw)
        self.queued = Gauge("gemma_jax_requests_queued", "completions waiting for a decode slot", **kw)
        self.running = Gauge("gemma_jax_requests_running", "completions holding a decode slot", **kw)
        self.prompt_tokens = Counter("gemma_jax_prompt_tokens", "prompt tokens of accepted requests", **kw)
        self.generation_tokens = Counter("gemma_jax_generation_tokens", "tokens generated", **kw)
        self.finished = Counter("gemma_jax_completions_finished", "completions by how they ended", ["reason"], **kw)
        self.time_to_first_token = Histogram("gemma_jax_time_to_first_token_seconds", "from submission to the first token",
                                             buckets=_TTFT_BUCKETS, **kw)  # fmt: skip
        rate = Gauge("gemma_jax_generation_tokens_per_second", f"tokens generated per second over the last {RATE_WINDOW:.0f} s", **kw)
        rate.set_function(self._rate)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def watch(self, *, queued: Callable[[], int], running: Callable[[], int]) -> None:
        self.queued.set_function(queued)
        self.running.set_function(running)

    def generated(self, tokens: int) -> None:
        if tokens:
            self.generation_tokens.inc(tokens)
            with self._lock:
                self._recent.append((time.monotonic(), tokens))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
