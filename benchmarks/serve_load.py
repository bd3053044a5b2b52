"""Load test of `gemma-jax serve`: concurrent streaming clients, next to `infer` at the same batch size.

In one run, on the same prompts (distinct lines of the GPL, as completions, greedy, --new-tokens each):
  * infer: `gemma_jax.infer.run_job` in this process with --batch-size slots; it runs once to
    compile (warm-up), then is timed. tokens/s = completion tokens / wall time.
  * serve: `gemma-jax serve` as a subprocess with the same slots and the same cache length
    (--max-len = what infer chooses), driven by --clients concurrent streaming clients (the
    official `openai` async client), every client sending one request at the same moment. A
    first wave compiles (warm-up); the second is timed. tokens/s = completion tokens of the wave
    / wall time from the first request sent to the last response done. TTFT = from sending a
    request to its first streamed text; ITL (inter-token latency) = per request,
    (last text - first text) / (completion tokens - 1).
Every request must complete; the served texts are compared with infer's (greedy: identical).

    python benchmarks/serve_load.py --ckpt gemma3-270m --clients 32 --new-tokens 32 --batch-size 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

import gemma_jax
from gemma_jax.generate import bucket
from gemma_jax.infer import run_job


def prompts(tokenizer, count: int) -> list[str]:
    """Distinct lines of the GPL that fit the shortest prompt bucket (16 tokens), which the server compiles at start."""
    lines = [line.strip() for line in Path("/usr/share/common-licenses/GPL-3").read_text().splitlines()]
    lines = [line for line in dict.fromkeys(lines) if 20 < len(line) and len(tokenizer.encode(line, add_bos=True)) <= 16]
    if len(lines) < count:
        sys.exit(f"only {len(lines)} distinct short prompts; use at most that many --clients")
    return lines[:count]


def time_infer(model, texts: list[str], *, slots: int, new_tokens: int, work: Path) -> tuple[float, dict[str, str]]:
    (work / "in.jsonl").write_text("".join(json.dumps({"id": str(i), "prompt": t}) + "\n" for i, t in enumerate(texts)))
    run_job(model, work / "in.jsonl", work / "warm.jsonl", slots=slots, max_new_tokens=new_tokens, report=print)
    start = time.perf_counter()
    summary = run_job(model, work / "in.jsonl", work / "out.jsonl", slots=slots, max_new_tokens=new_tokens, report=print)
    seconds = time.perf_counter() - start
    done = {r["id"]: r["completion"] for r in map(json.loads, (work / "out.jsonl").read_text().splitlines())}
    return summary.completion_tokens / seconds, done


async def one_request(client, text: str, new_tokens: int) -> dict:
    sent = time.perf_counter()
    stream = await client.completions.create(model="m", prompt=text, max_tokens=new_tokens, temperature=0, stream=True,
                                             stream_options={"include_usage": True})  # fmt: skip
    first = last = None
    pieces, tokens = [], 0
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
            pieces.append(chunk.choices[0].text)
    return dict(sent=sent, first=first, last=last, tokens=tokens, text="".join(pieces))


async def wave(port: int, texts: list[str], new_tokens: int) -> tuple[list[dict], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    start = time.perf_counter()
    results = await asyncio.gather(*(one_request(client, t, new_tokens) for t in texts))
    seconds = time.perf_counter() - start
    await client.close()
    return list(results), seconds


def start_server(args, max_len: int, port: int) -> subprocess.Popen:
    cmd = ["gemma-jax", "serve", "--ckpt", args.ckpt, "--port", str(port), "--batch-size", str(args.batch_size),
           "--max-len", str(max_len), "--max-queue", str(args.clients), "--served-model-name", "m"]  # fmt: skip
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL if not args.verbose else None)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return server
        except OSError:
            if server.poll() is not None:
                sys.exit(f"the server exited with status {server.returncode}")
            time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="gemma3-270m")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--verbose", action="store_true", help="show the server's log")
    args = parser.parse_args()

    model = gemma_jax.load(args.ckpt, dtype="float32")
    texts = prompts(model.tokenizer, args.clients)
    longest = max(len(model.tokenizer.encode(t, add_bos=True)) for t in texts)
    max_len = min(model.config.max_position, bucket(longest) + bucket(args.new_tokens))  # what infer allocates
    with tempfile.TemporaryDirectory() as work:
        infer_rate, infer_texts = time_infer(model, texts, slots=args.batch_size, new_tokens=args.new_tokens, work=Path(work))
    del model

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = start_server(args, max_len, port)
    try:
        asyncio.run(wave(port, texts, args.new_tokens))  # warm-up: compiles the prefill shapes this load needs
        results, seconds = asyncio.run(wave(port, texts, args.new_tokens))
    finally:
        server.send_signal(signal.SIGTERM)
        status = server.wait(timeout=300)

    complete = sum(r["tokens"] > 0 and r["first"] is not None for r in results)
    identical = sum(r["text"] == infer_texts[str(i)] for i, r in enumerate(results))
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["first"] - r["sent"] for r in results if r["first"] is not None]
    itl = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    serve_rate = tokens / seconds
    print(f"\n{args.ckpt}: {args.clients} streaming clients x {args.new_tokens} new tokens, batch size {args.batch_size}, "
          f"max_len {max_len}, {os.cpu_count()} CPUs ({os.getloadavg()[0]:.1f} load)")  # fmt: skip
    print("| | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | completed | = infer text |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| infer | {infer_rate:.1f} | | | | | {len(infer_texts)}/{args.clients} | |")
    print(f"| serve | {serve_rate:.1f} ({serve_rate / infer_rate:.0%} of infer) | {percentile(ttft, 50):.0f} | "
          f"{percentile(ttft, 99):.0f} | {percentile(itl, 50):.1f} | {percentile(itl, 99):.1f} | "
          f"{complete}/{args.clients} | {identical}/{args.clients} |")  # fmt: skip
    print(f"server exit status after SIGTERM: {status}")


if __name__ == "__main__":
    main()
