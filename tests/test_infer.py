"""Inference jobs: continuous batching equals per-prompt generation, restarts, bad input; perplexity."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import gemma_jax
from gemma_jax.infer import run_job
from gemma_jax.perplexity import perplexity

PROMPTS = ["The license", "You may convey", "Everyone is permitted to copy and distribute verbatim copies",
           "GNU", "This License applies to any program or other work which contains a notice", "Preamble"]  # fmt: skip


@pytest.fixture(scope="module")
def model(text_checkpoint):
    return gemma_jax.load(text_checkpoint[1], dtype="float32")


def _write_inputs(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _read(path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_infer_greedy_equals_per_prompt_generate(model, tmp_path):
    records = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    records.append({"id": "chat", "messages": [{"role": "user", "content": "Hello"}]})
    _write_inputs(tmp_path / "in.jsonl", records)
    summary = run_job(model, tmp_path / "in.jsonl", tmp_path / "out.jsonl", slots=3, max_new_tokens=20)
    out = _read(tmp_path / "out.jsonl")
    assert summary.done == len(records) == len(out)
    for r in records:
        prompt = r.get("prompt") or r["messages"]
        [want] = model.complete([prompt], max_new_tokens=20, chat="messages" in r)
        got = out[r["id"]]
        assert (got["completion"], got["completion_tokens"], got["finish_reason"]) == (want.text, len(want.tokens), want.finish_reason)
        assert got["prompt_tokens"] == want.prompt_tokens
    assert len({o["completion"] for o in out.values()}) > 3  # varied text, not one degenerate string


def test_sampled_outputs_are_reproducible_per_id(model, tmp_path):
    records = [{"id": f"s{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    _write_inputs(tmp_path / "a.jsonl", records)
    _write_inputs(tmp_path / "b.jsonl", records[::-1][:4])  # other order, other batch company
    options = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    run_job(model, tmp_path / "a.jsonl", tmp_path / "a.out", slots=4, **options)
    run_job(model, tmp_path / "b.jsonl", tmp_path / "b.out", slots=2, **options)
    a, b = _read(tmp_path / "a.out"), _read(tmp_path / "b.out")
    assert all(a[i] == b[i] for i in b)
    run_job(model, tmp_path / "b.jsonl", tmp_path / "c.out", slots=2, **{**options, "seed": 8})
    assert any(_read(tmp_path / "c.out")[i] != b[i] for i in b)


def test_bad_lines_are_reported_and_skipped_or_fatal(model, tmp_path):
    lines = [json.dumps({"id": "ok", "prompt": "GNU"}), "{not json", json.dumps({"prompt": "no id"}),
             json.dumps({"id": "ok", "prompt": "again"}), json.dumps({"id": "empty", "prompt": ""}),
             json.dumps({"id": "long", "prompt": "GNU " * 3000}), json.dumps({"id": "ok2", "prompt": "Preamble"})]  # fmt: skip
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    reports: list[str] = []
    summary = run_job(model, tmp_path / "in.jsonl", tmp_path / "out.jsonl", slots=2, max_new_tokens=4, report=reports.append)
    assert set(_read(tmp_path / "out.jsonl")) == {"ok", "ok2"} and summary.rejected == 5
    assert [r.split(": ")[0].rsplit(":", 1)[1] for r in reports] == ["2", "3", "4", "5", "6"]
    assert "duplicate id" in reports[2] and "context" in reports[4]
    with pytest.raises(ValueError, match="5 bad input line"):
        run_job(model, tmp_path / "in.jsonl", tmp_path / "strict.jsonl", slots=2, max_new_tokens=4, strict=True, report=reports.append)
    assert not (tmp_path / "strict.jsonl").exists()


def test_prompt_near_the_context_runs_as_generate_does(model, tmp_path):
    words = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read().split()
    long = next(text for text in (" ".join(words[:n]) for n in range(1, 400)) if len(model.tokenizer.encode(text, add_bos=True)) > 140)
    assert 140 < len(model.tokenizer.encode(long, add_bos=True)) <= 216  # bucketed to the context, 256; + 40 new fits it
    records = [{"id": "a", "prompt": "GNU"}, {"id": "long", "prompt": long}, {"id": "b", "prompt": "Preamble"}]
    _write_inputs(tmp_path / "in.jsonl", records)
    summary = run_job(model, tmp_path / "in.jsonl", tmp_path / "out.jsonl", slots=2, max_new_tokens=40)
    [want] = model.complete([long], max_new_tokens=40)
    got = _read(tmp_path / "out.jsonl")
    assert summary.done == 3 and (got["long"]["completion"], got["long"]["completion_tokens"]) == (want.text, len(want.tokens))


def test_undecodable_lines_are_reported_and_skipped(model, tmp_path):
    lines = [json.dumps({"id": "ok", "prompt": "GNU"}).encode(), b'{"id": "latin1", "prompt": "caf\xe9"}',
             b'{"id": "lone", "prompt": "\\ud800"}', json.dumps({"id": "msg", "messages": [{"role": "user", "content": "\udc00"}]}).encode(),
             json.dumps({"id": "ok2", "prompt": "Preamble"}).encode()]  # fmt: skip
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    reports: list[str] = []
    summary = run_job(model, tmp_path / "in.jsonl", tmp_path / "out.jsonl", slots=2, max_new_tokens=4, report=reports.append)
    assert set(_read(tmp_path / "out.jsonl")) == {"ok", "ok2"} and summary.rejected == 3
    assert [r.split(": ")[0] for r in reports] == [f"{tmp_path / 'in.jsonl'}:{n}" for n in (2, 3, 4)]
    assert "byte 0xe9 at column 32" in reports[0] and all("UTF-8" in r for r in reports)


def test_unusable_outputs_and_arguments_fail_before_any_work(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_inputs(Path("in.jsonl"), [{"id": "a", "prompt": "GNU"}, {"id": "b", "prompt": "Preamble"}])
    job = lambda output, **kw: run_job(model, Path("in.jsonl"), Path(output), **{"slots": 2, "max_new_tokens": 4, **kw})
    Path("dir").mkdir()
    with pytest.raises(ValueError, match="^dir: cannot write the output: Is a directory$"):
        job("dir")
    with pytest.raises(ValueError, match="^in.jsonl/out.jsonl: cannot write the output: Not a directory$"):
        job("in.jsonl/out.jsonl")
    before = Path("in.jsonl").read_bytes()
    with pytest.raises(ValueError, match="^in.jsonl: the output file is the input file"):
        job("in.jsonl")
    assert Path("in.jsonl").read_bytes() == before
    for name, text in [("noid.jsonl", '{"completion": "x"}\n'), ("garbage.jsonl", '{"id": "a"}\n{oops\n{"id": "c"}\n')]:
        Path(name).write_text(text)
        with pytest.raises(ValueError, match=f"^{name}:{1 if name == 'noid.jsonl' else 2}: not a result line"):
            job(name)
        assert Path(name).read_text() == text  # nothing appended, nothing cut
    for bad, message in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-5), "max_new_tokens"),
                         (dict(slots=0), "slots"), (dict(slots=-1), "slots"), (dict(seed=2**70), "seed")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            job("out.jsonl", **bad)
    assert not Path("out.jsonl").exists()


def test_killed_job_resumes_with_every_id_exactly_once(text_checkpoint, tmp_path):
    _write_inputs(tmp_path / "in.jsonl", [{"id": f"k{i}", "prompt": PROMPTS[i % len(PROMPTS)] + f" {i}"} for i in range(24)])
    cmd = ["gemma-jax", "infer", "--ckpt", str(text_checkpoint[1]), "--input", str(tmp_path / "in.jsonl"),
           "--max-new-tokens", "24", "--batch-size", "2", "--dtype", "float32"]  # fmt: skip
    out = tmp_path / "out.jsonl"
    job = subprocess.Popen([*cmd, "--output", str(out)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.2)
    job.kill()  # SIGKILL, mid-job
    job.wait()
    partial = _read(out)
    assert 3 <= len(partial) < 24
    subprocess.run([*cmd, "--output", str(out)], check=True, stderr=subprocess.DEVNULL)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(f"k{i}" for i in range(24))  # each exactly once
    final = {r["id"]: r for r in lines}
    assert all(final[i] == partial[i] for i in partial)  # completed ones unchanged
    subprocess.run([*cmd, "--output", str(tmp_path / "clean.jsonl")], check=True, stderr=subprocess.DEVNULL)
    assert _read(tmp_path / "clean.jsonl") == final  # and equal to an uninterrupted run


def test_torn_last_line_is_cut_before_resuming(model, tmp_path):
    _write_inputs(tmp_path / "in.jsonl", [{"id": "a", "prompt": "GNU"}, {"id": "b", "prompt": "Preamble"}])
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "a", "completion": "x"}) + '\n{"id": "b", "compl')
    run_job(model, tmp_path / "in.jsonl", out, slots=2, max_new_tokens=4)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]


@pytest.mark.parametrize("stride", [None, 24])
def test_perplexity_follows_the_llama_cpp_method(model, stride):
    text = open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read()[:3000]
    ctx = 64
    result = perplexity(model, text, ctx=ctx, stride=stride, batch=3)
    ids = model.tokenizer.encode(text, add_bos=True)
    if stride is None:  # disjoint chunks, BOS first, score predictions ctx/2 .. ctx-2
        chunks = [[model.tokenizer.bos_id] + ids[s + 1 : s + ctx] for s in range(0, len(ids) // ctx * ctx, ctx)]
        first = ctx // 2
    else:
        chunks = [ids[s : s + ctx] for s in range(0, len(ids) - ctx + 1, stride)]
        first = ctx - 1 - stride
    nll = []
    for chunk in chunks:
        logits = model.logits([chunk])[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        nll += [-logp[j, chunk[j + 1]] for j in range(first, ctx - 1)]
    assert result.tokens_scored == len(nll) and result.windows == len(chunks)
    assert result.ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)


def test_perplexity_needs_enough_text(model):
    with pytest.raises(ValueError, match="at least"):
        perplexity(model, "GNU General Public License", ctx=64)
