"""Start-up and shutdown: build the engine, warm it up, serve HTTP on process 0, follow elsewhere.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits up to
`shutdown_timeout` seconds for running requests to finish, then cancels the rest; the engine
thread then stops (telling the other processes of a multi-host mesh to stop too) and the
process exits 0.
"""

from __future__ import annotations

import signal
import sys

import uvicorn

from gemma_jax import distributed
from gemma_jax.api import Gemma
from gemma_jax.engine import Engine
from gemma_jax.sampling import RowSampler
from gemma_jax.serve.app import create_app
from gemma_jax.serve.scheduler import Scheduler


def build(model: Gemma, *, slots: int, max_len: int | None, max_queue: int, page_size: int = 32,
          kv_tokens: int | None = None) -> Scheduler:  # fmt: skip
    """The engine and its scheduler, warmed up (every process of a mesh builds the same)."""
    if model.tokenizer is None:
        raise ValueError("serving needs a checkpoint with a tokenizer")
    if slots < 1:
        raise ValueError(f"--batch-size must be >= 1, got {slots}")
    max_len = min(model.config.max_position, 4096) if max_len is None else max_len
    if not 2 <= max_len <= model.config.max_position:
        raise ValueError(f"--max-len must be in [2, {model.config.max_position}] (the model's context), got {max_len}")
    # Empty and padding rows are greedy, so that a batch of greedy requests skips the sampling sort.
    if kv_tokens is not None and kv_tokens < max_len:
        raise ValueError(f"--kv-tokens ({kv_tokens}) must hold one request of --max-len ({max_len}) tokens")
    engine = Engine(model, slots=slots, max_len=max_len, sampler=RowSampler(), temperature=0.0, stop_ids=model.stop_ids(),
                    page_size=page_size, kv_tokens=kv_tokens)  # fmt: skip
    return Scheduler(engine, model.tokenizer, max_queue=max_queue)


def config(scheduler: Scheduler, *, model_name: str, api_key: str | None, host: str, port: int,
           shutdown_timeout: float, log_level: str = "info") -> uvicorn.Config:  # fmt: skip
    app = create_app(scheduler, model_name=model_name, api_key=api_key)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                          lifespan="on", access_log=False)  # fmt: skip


def serve(model: Gemma, *, model_name: str, host: str, port: int, slots: int, max_len: int | None, max_queue: int,
          api_key: str | None, shutdown_timeout: float, page_size: int = 32, kv_tokens: int | None = None) -> None:  # fmt: skip
    """Serve until SIGTERM/SIGINT (process 0), or follow process 0's engine calls (the others)."""
    scheduler = build(model, slots=slots, max_len=max_len, max_queue=max_queue, page_size=page_size, kv_tokens=kv_tokens)
    if not distributed.is_leader():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # process 0 drains, then tells this one to stop
        scheduler.follow()
        return
    scheduler.warm_up()
    scheduler.start()
    server = uvicorn.Server(config(scheduler, model_name=model_name, api_key=api_key, host=host, port=port,
                                   shutdown_timeout=shutdown_timeout))  # fmt: skip
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers that is a no-op (exit 0).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    engine = scheduler.engine
    print(f"serving {model_name} on http://{host}:{port}/v1 ({engine.slots} slots, requests up to {engine.max_len} "
          f"tokens, KV pages for {engine.kv_tokens} tokens, queue {max_queue})", file=sys.stderr, flush=True)  # fmt: skip
    server.run()
    scheduler.close()
