"""HTTP routes: OpenAI-compatible completions and chat (plain and streamed), models, health, metrics.

A handler validates the body, encodes the prompt, submits one engine job per choice to the
`Scheduler` and relays the jobs' events: as server-sent events when `stream` is set, else as
one response at the end. A client that goes away cancels its jobs (its slots free at the next
engine step). Every error is an OpenAI-style JSON body; none shows a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import sys
import time
import traceback
import uuid
from typing import Any, AsyncIterator

import jax
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gemma_jax.engine import Request as EngineRequest
from gemma_jax.serve import protocol
from gemma_jax.serve.protocol import BadRequest, ChatRequest, CompletionRequest, error_body
from gemma_jax.serve.scheduler import Event, Job, QueueFull, Scheduler, ShuttingDown

MAX_BODY_BYTES = 8 << 20
DISCONNECT_POLL = 0.5  # seconds between client checks while a non-streamed request waits
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def create_app(scheduler: Scheduler, *, model_name: str, api_key: str | None = None) -> Starlette:
    """The ASGI app; `scheduler` must be started (and is closed when the app shuts down)."""
    engine, tokenizer = scheduler.engine, scheduler.tokenizer
    metrics, created = scheduler.metrics, int(time.time())

    async def completions(request: Request) -> Response:
        params = protocol.parse(CompletionRequest, await _body(request))
        prompts = _completion_prompts(params.prompt, tokenizer)
        return await _generate(request, params, prompts, chat=False, default_max=16)

    async def chat(request: Request) -> Response:
        params = protocol.parse(ChatRequest, await _body(request))
        try:
            ids = tokenizer.encode_chat([{"role": m.role, "content": m.text()} for m in params.messages])
        except ValueError as err:
            raise BadRequest(f"messages: {err}", "messages") from None
        if params.max_completion_tokens is not None:
            params.max_tokens = params.max_completion_tokens
        return await _generate(request, params, [ids], chat=True, default_max=None)

    async def _generate(request: Request, params, prompts: list[list[int]], *, chat: bool, default_max: int | None) -> Response:
        if params.n > engine.slots:
            raise BadRequest(f"n must be at most {engine.slots} (the server's decode slots), got {params.n}", "n")
        stops, loop, events = params.stops(), asyncio.get_running_loop(), asyncio.Queue()
        seed = secrets.randbits(32) if params.seed is None else params.seed % (1 << 32)
        temperature = 1.0 if params.temperature is None else params.temperature
        jobs = []
        for p, ids in enumerate(prompts):
            max_new = _max_new_tokens(len(ids), params.max_tokens, default_max, engine.max_len)
            for c in range(params.n):
                index = p * params.n + c

                def emit(event: Event, index=index) -> None:  # engine thread -> this request's queue
                    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                        loop.call_soon_threadsafe(events.put_nowait, (index, event))

                key = np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), c))  # as Gemma.complete's row c
                er = EngineRequest(uuid.uuid4().hex, ids, max_new, temperature=temperature, top_p=params.top_p or 1.0,
                                   top_k=max(params.top_k or 0, 0), key=key)  # fmt: skip
                jobs.append(scheduler.job(er, stops, emit))
        scheduler.submit(jobs)
        metrics.prompt_tokens.inc(sum(map(len, prompts)))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = dict(chat=chat, rid=rid, created=int(time.time()), model=model_name)
        prompt_tokens = sum(map(len, prompts))
        if params.stream:
            stream = _stream(events, jobs, head, prompt_tokens, params.include_usage())
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(request, events, jobs, head, prompt_tokens)

    async def _stream(events: asyncio.Queue, jobs: list[Job], head: dict, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        chunk = lambda choices, **kw: protocol.sse(protocol.envelope(**head, chunk=True, choices=choices, **kw))
        try:
            if head["chat"]:
                yield chunk([protocol.choice(True, i, "", None, delta=True, first=True) for i in range(len(jobs))])
            left, completion_tokens = len(jobs), 0
            while left:
                index, event = await events.get()
                if event.finish_reason == "error":
                    yield protocol.sse(error_body(event.error, "server_error"))
                    return
                if event.text or event.finish_reason:
                    yield chunk([protocol.choice(head["chat"], index, event.text, event.finish_reason, delta=True)])
                if event.finish_reason:
                    left, completion_tokens = left - 1, completion_tokens + event.completion_tokens
            if include_usage:
                yield chunk([], usage=protocol.usage(prompt_tokens, completion_tokens))
            yield protocol.sse("[DONE]")
        finally:  # also when the client disconnects (the response task is cancelled)
            scheduler.cancel(jobs)

    async def _collect(request: Request, events: asyncio.Queue, jobs: list[Job], head: dict, prompt_tokens: int) -> Response:
        texts, reasons, tokens = [""] * len(jobs), [None] * len(jobs), 0
        try:
            while None in reasons:
                try:
                    index, event = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if event.finish_reason == "error":
                    return _error(500, event.error, "server_error")
                texts[index] += event.text
                if event.finish_reason:
                    reasons[index], tokens = event.finish_reason, tokens + event.completion_tokens
        finally:
            scheduler.cancel(jobs)
        choices = [protocol.choice(head["chat"], i, t, r, delta=False) for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse(protocol.envelope(**head, chunk=False, choices=choices, usage=protocol.usage(prompt_tokens, tokens)))

    async def models(_: Request) -> Response:
        card = dict(id=model_name, object="model", created=created, owned_by="gemma_jax", max_model_len=engine.max_len)
        return JSONResponse(dict(object="list", data=[card]))

    async def health(_: Request) -> Response:
        if not scheduler.alive:
            return _error(503, f"the engine is not running{f': {scheduler.failure}' if scheduler.failure else ''}", "server_error")
        return JSONResponse(dict(status="ok", running=engine.running, slots=engine.slots))

    async def metrics_route(_: Request) -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        yield
        await asyncio.to_thread(scheduler.close)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ]
    handlers = {
        BadRequest: lambda _, err: _error(400, str(err), "invalid_request_error", err.param),
        QueueFull: lambda _, err: _error(429, str(err), "rate_limit_error", code="queue_full"),
        ShuttingDown: lambda _, err: _error(503, str(err), "server_error", code="unavailable"),
        HTTPException: lambda _, err: _error(err.status_code, str(err.detail), "invalid_request_error"),
        Exception: _internal_error,
    }
    middleware = [Middleware(_CountRequests, metrics=metrics), Middleware(_BearerAuth, api_key=api_key)]
    return Starlette(routes=routes, exception_handlers=handlers, middleware=middleware, lifespan=lifespan)


def _completion_prompts(prompt: protocol.Prompt, tokenizer) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, a token-id list, or a list of those."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt or not all(prompt):
        raise BadRequest("prompt must not be empty", "prompt")
    ids = [tokenizer.encode(p, add_bos=True) if isinstance(p, str) else list(p) for p in prompt]
    bad = [t for i in ids for t in i if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise BadRequest(f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})", "prompt")
    return ids


def _max_new_tokens(prompt_tokens: int, requested: int | None, default: int | None, max_len: int) -> int:
    """The completion budget: `max_tokens`, else the default (else the rest of the context); 400 if it does not fit."""
    room = max_len - prompt_tokens
    wanted = requested if requested is not None else min(default or room, room)
    if room < 1 or wanted > room:
        raise BadRequest(
            f"this server's context is {max_len} tokens, but the request needs {prompt_tokens + max(wanted, 1)} "
            f"({prompt_tokens} in the prompt, {max(wanted, 1)} to generate)", "max_tokens" if room >= 1 else "prompt",
        )  # fmt: skip
    return wanted


async def _body(request: Request) -> bytes:
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"the body is larger than {MAX_BODY_BYTES >> 20} MiB")
    return bytes(body)


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def _internal_error(_: Request, err: Exception) -> JSONResponse:
    traceback.print_exception(err, file=sys.stderr)
    return _error(500, f"internal error: {type(err).__name__}", "server_error")


class _BearerAuth:
    """With an API key, /v1/* requests need `Authorization: Bearer KEY` (else 401); /health and /metrics stay open."""

    def __init__(self, app, api_key: str | None):
        self.app, self.expected = app, None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if self.expected is not None and scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = _error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "invalid_request_error",
                                  code="invalid_api_key")  # fmt: skip
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _CountRequests:
    """Counts HTTP requests by route and status for /metrics."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted_send)
