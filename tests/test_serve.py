"""`gemma-jax serve`: the official `openai` client gets what `Gemma.complete` gives; faults leave the server serving."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest
import uvicorn

import gemma_jax
from gemma_jax import generate
from gemma_jax.serve.server import build, config
from gemma_jax.tiny import tiny_checkpoint

KEY = "test-key"
SLOTS, QUEUE, MAX_LEN = 4, 6, 256  # the 9 jobs of the concurrent test fit slots + queue whatever the timing; 16 do not


@pytest.fixture(scope="module")
def model(text_checkpoint):
    return gemma_jax.load(text_checkpoint[1], dtype="float32")


@pytest.fixture(scope="module")
def server(model):
    """A server in this process (a thread), on a free port."""
    scheduler = build(model, slots=SLOTS, max_len=MAX_LEN, max_queue=QUEUE)
    scheduler.warm_up()
    scheduler.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app_server = uvicorn.Server(config(scheduler, model_name="tiny", api_key=KEY, host="127.0.0.1", port=port,
                                       shutdown_timeout=5, log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=app_server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    while not app_server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    yield SimpleNamespace(port=port, scheduler=scheduler, client=_client(port))
    app_server.should_exit = True
    thread.join(30)


def _client(port: int, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def _raw(port: int, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY) -> tuple[int, dict | str]:
    """One plain HTTP request (no client-side validation, no retries): (status, JSON body or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    conn.request(method, path, body=json.dumps(body) if isinstance(body, dict) else body, headers=headers)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text


def _metric(port: int, name: str) -> float:
    text = _raw(port, "GET", "/metrics")[1]
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


PROMPTS = ["The license", "You may convey", "Everyone is permitted to copy"]


def test_completions_and_chat_equal_generate_streamed_or_not(server, model):
    client = server.client
    for prompt in PROMPTS[:2]:
        [want] = model.complete([prompt], max_new_tokens=16)
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
        assert (got.choices[0].text, got.choices[0].finish_reason) == (want.text, want.finish_reason)
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, len(want.tokens))
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))  # fmt: skip
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [want.finish_reason]
        assert chunks[-1].usage.completion_tokens == len(want.tokens) and len(chunks) > 2  # streamed in pieces
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What may I convey?"}]
    [want] = model.complete([messages], max_new_tokens=16, chat=True)
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == (want.text, want.finish_reason)
    assert got.usage.prompt_tokens == want.prompt_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_concurrent_mixed_requests_each_get_their_own_result(server, model):
    """More requests than slots, with different lengths, stops and sampling, arriving together."""
    sampled = dict(temperature=0.9, top_p=0.8, seed=11)
    cases = [dict(prompt=p, max_tokens=m) for p, m in zip(PROMPTS * 2, (5, 16, 12, 15, 9, 14))]  # one bucket for complete()
    cases += [dict(prompt=PROMPTS[0], max_tokens=16, stop=[" "]), dict(prompt=PROMPTS[1], max_tokens=16, n=2, **sampled)]

    def ask(case):
        extra = {"temperature": 0} | {k: case[k] for k in ("stop", "n", "temperature", "top_p", "seed") if k in case}
        return server.client.completions.create(model="tiny", prompt=case["prompt"], max_tokens=case["max_tokens"], **extra)

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(ask, cases))
    for case, got in zip(cases, results):
        options = {k: case[k] for k in ("stop", "temperature", "top_p", "seed") if k in case}
        want = model.complete([case["prompt"]] * case.get("n", 1), max_new_tokens=case["max_tokens"], **options)
        assert [c.text for c in got.choices] == [w.text for w in want], case
        assert [c.finish_reason for c in got.choices] == [w.finish_reason for w in want], case
    assert results[-1].choices[0].text != results[-1].choices[1].text  # n=2 samples differ
    compiled = generate._decode._cache_size()
    again = ask(cases[-1])
    assert [c.text for c in again.choices] == [c.text for c in results[-1].choices]  # seeded: reproducible
    for settings in (dict(temperature=0.5, top_k=5), dict(temperature=1.7, top_p=0.3, seed=1), dict(temperature=0)):
        server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=9, extra_body=settings)
    assert generate._decode._cache_size() == compiled  # per-row settings are traced: one compiled step


BAD = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", {"prompt": "GNU", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "GNU", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "GNU", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "GNU", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "GNU", "n": 99}, "n"),
    ("/v1/completions", {"prompt": "GNU", "stop": [3]}, "stop"),
    ("/v1/completions", {"prompt": "GNU", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [5, 100000]}, "prompt"),
    ("/v1/completions", {"prompt": "GNU " * 300}, "prompt"),
    ("/v1/completions", {"prompt": "GNU", "max_tokens": MAX_LEN}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
]


def test_malformed_requests_get_400_and_the_server_goes_on(server, model):
    for path, body, param in BAD:
        status, reply = _raw(server.port, "POST", path, body)
        assert status == 400, (body, reply)
        error = reply["error"]
        assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"], reply
        assert param is None or param in (error["param"] or "") or param in error["message"], (body, error)
    assert _raw(server.port, "POST", "/v1/completions", b"[1, 2]")[0] == 400
    assert _raw(server.port, "GET", "/v1/nothing")[0] == 404
    assert _raw(server.port, "GET", "/health") == (200, {"status": "ok", "running": 0, "slots": SLOTS})
    [want] = model.complete(["GNU"], max_new_tokens=6)
    assert server.client.completions.create(model="tiny", prompt="GNU", max_tokens=6, temperature=0).choices[0].text == want.text


def test_api_key_is_required(server):
    for key in (None, "wrong"):
        status, reply = _raw(server.port, "POST", "/v1/completions", {"prompt": "GNU"}, key=key)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(server.port, key="wrong").models.list()
    assert _raw(server.port, "GET", "/health", key=None)[0] == 200


def test_killed_client_frees_its_slot(server, model):
    cancelled = _metric(server.port, "gemma_jax_completions_finished_total")
    generated = _metric(server.port, "gemma_jax_generation_tokens_total")
    for _ in range(2):  # a client that reads one event then vanishes, twice
        sock = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({"prompt": PROMPTS[2], "max_tokens": 240, "temperature": 0, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        received = b""
        while b"data: " not in received:
            received += sock.recv(65536)
        sock.close()
    deadline = time.time() + 30
    while _metric(server.port, "gemma_jax_requests_running") and time.time() < deadline:
        time.sleep(0.05)
    assert _metric(server.port, "gemma_jax_requests_running") == 0
    assert _metric(server.port, "gemma_jax_completions_finished_total") == cancelled + 2
    assert 'gemma_jax_completions_finished_total{reason="cancelled"}' in _raw(server.port, "GET", "/metrics")[1]
    assert _metric(server.port, "gemma_jax_generation_tokens_total") - generated < 2 * 200  # far from 2 x 240
    [want] = model.complete([PROMPTS[2]], max_new_tokens=10)
    assert server.client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=10, temperature=0).choices[0].text == want.text


def test_flood_beyond_the_queue_gets_429(server):
    body = {"prompt": PROMPTS[2], "max_tokens": 200, "temperature": 0}
    start = threading.Barrier(16)

    def ask(_):
        start.wait()
        return _raw(server.port, "POST", "/v1/completions", body)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(16)))
    statuses = sorted(s for s, _ in replies)
    assert set(statuses) == {200, 429} and statuses.count(200) >= SLOTS + QUEUE, statuses
    assert all(r["error"]["code"] == "queue_full" for s, r in replies if s == 429)
    texts = {r["choices"][0]["text"] for s, r in replies if s == 200}
    assert len(texts) == 1  # every accepted request completed, identically
    assert _raw(server.port, "GET", "/health")[0] == 200
    assert _metric(server.port, "gemma_jax_requests_queued") == 0


def test_sigterm_finishes_running_requests_and_exits_0(tmp_path, monkeypatch):
    """The CLI as users run it; the demo checkpoint's 2048-token context makes the requests outlast the signal."""
    monkeypatch.chdir(tmp_path)
    ckpt = tiny_checkpoint(tmp_path / "cache")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = ["gemma-jax", "serve", "--ckpt", str(ckpt), "--dtype", "float32", "--port", str(port), "--batch-size", "2",
           "--max-len", "1024", "--served-model-name", "tiny", "--shutdown-timeout", "120"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while _health(port) != 200:
            assert server.poll() is None and time.time() < deadline, server.stdout.read()
            time.sleep(0.2)
        client = _client(port, key="none")
        ask = lambda: client.completions.create(model="tiny", prompt="GNU", max_tokens=600, temperature=0, stream=True,
                                                stream_options={"include_usage": True})  # fmt: skip
        streams = [ask(), ask()]
        firsts = [next(s) for s in streams]
        server.send_signal(signal.SIGTERM)
        chunks = [[first, *stream] for first, stream in zip(firsts, streams)]
        assert server.wait(timeout=120) == 0
    finally:
        if server.poll() is None:
            server.kill()
    log = server.stdout.read()
    assert "Traceback" not in log and "Waiting for connections to close" in log, log  # drained, not cut
    texts = ["".join(c.choices[0].text for c in cs if c.choices) for cs in chunks]
    assert texts[0] == texts[1] and all(cs[-1].usage.completion_tokens == 600 for cs in chunks)
    assert _health(port) is None  # no longer listening


def _health(port: int) -> int | None:
    try:
        return _raw(port, "GET", "/health")[0]
    except OSError:
        return None


def test_warm_up_with_a_kv_budget_smaller_than_the_slots(model):
    """8 slots over 4 pages of 16 tokens: warm-up admits what the pages hold and gives every page back."""
    scheduler = build(model, slots=8, max_len=64, max_queue=4, page_size=16, kv_tokens=64)
    scheduler.warm_up()
    engine = scheduler.engine
    assert engine.running == 0 and all(len(engine.free_pages[w]) == n - 1 for w, n in engine.capacity.items())
