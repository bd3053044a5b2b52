"""Batch inference jobs: JSONL prompts in, JSONL completions out, restartable.

Input lines are `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [...]}`; output
lines `{"id", "completion", "prompt_tokens", "completion_tokens", "finish_reason"}`. Every
result is appended, flushed and fsynced as its request finishes, before decoding goes on,
so a killed job loses at most the requests in flight; rerunning the same command
skips the ids already in the output (a torn last line is cut off first). Bad input lines are
reported with their line numbers and skipped (or, with `strict`, fail before any generation).
On multi-host runs every process reads the inputs and runs the engine; only process 0 reads
and writes the output file, and its view of what is already done is broadcast to the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import IO, Any, Callable, Iterator, TypeVar

import numpy as np

from gemma_jax.api import Gemma
from gemma_jax.distributed import from_leader
from gemma_jax.engine import Engine, Finished, Request
from gemma_jax.generate import bucket, check_max_new_tokens
from gemma_jax.sampling import Sampler, check_seed

T = TypeVar("T")


@dataclasses.dataclass
class JobSummary:
    done: int  # requests completed by this run
    skipped: int  # ids already in the output
    rejected: int  # bad input lines
    prompt_tokens: int
    completion_tokens: int


def read_requests(
    model: Gemma, path: Path, *, max_new_tokens: int, strict: bool, report: Callable[[str], None]
) -> tuple[list[Request], int]:
    """Parse and validate the input file: (requests, bad lines); each bad line is reported as `path:line: reason`."""
    parse = lambda rid, record: _parse(model, rid, record, max_new_tokens)  # noqa: E731
    return read_records(path, parse, strict=strict, report=report, nothing_done="nothing was generated")


def read_records(
    path: Path, parse: Callable[[str, dict[str, Any]], T], *, strict: bool, report: Callable[[str], None], nothing_done: str
) -> tuple[list[T], int]:
    """A JSONL job input: (parse(id, record) of each good line, number of bad lines).

    Every line must be a JSON object with a unique "id" (string or integer); `parse` raises
    ValueError or TypeError for anything else it refuses. Each bad line is reported as
    `path:line: reason` and skipped, or, with `strict`, all of them fail the job before any work
    (`nothing_done` says what was not done).
    """
    items, seen, problems = [], set(), []
    for number, line in enumerate(_lines(path), start=1):
        try:  # each line decoded alone: one bad byte costs its line, not the job
            text = line.decode("utf-8")
            if not text.strip():
                continue
            record = json.loads(text)
            rid = _record_id(record, seen)
            item = parse(rid, record)
        except UnicodeDecodeError as err:
            problems.append(f"{path}:{number}: not UTF-8 text (byte 0x{line[err.start]:02x} at column {err.start + 1})")
            continue
        except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
            problems.append(f"{path}:{number}: {err}")
            continue
        seen.add(rid)
        items.append(item)
    for problem in problems:
        report(problem)
    if problems and strict:
        raise ValueError(f"{len(problems)} bad input line(s) in {path} (first: {problems[0]}); {nothing_done}")
    return items, len(problems)


def _lines(path: Path) -> Iterator[bytes]:
    """The file's lines as bytes; a path that cannot be read is a one-line error naming it."""
    try:
        with open(path, "rb") as f:
            yield from f
    except OSError as err:
        raise ValueError(f"{path}: cannot read: {err.strerror}") from None


def _record_id(record: Any, seen: set[str]) -> str:
    if not isinstance(record, dict):
        raise ValueError("a line must be a JSON object")
    if "id" not in record or not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
        raise ValueError('missing or invalid "id" (a string or integer)')
    rid = str(record["id"])
    if rid in seen:
        raise ValueError(f"duplicate id {rid!r}")
    return rid


def _parse(model: Gemma, rid: str, record: dict[str, Any], max_new_tokens: int) -> Request:
    if "messages" in record:
        ids = model.tokenizer.encode_chat(record["messages"])
    elif isinstance(record.get("prompt"), str) and record["prompt"]:
        ids = model.tokenizer.encode(record["prompt"], add_bos=True)
    else:
        raise ValueError('needs a non-empty "prompt" string or a "messages" list')
    if len(ids) >= model.config.max_position:
        raise ValueError(f"prompt of {len(ids)} tokens does not fit the context of {model.config.max_position}")
    return Request(rid, ids, min(max_new_tokens, model.config.max_position - len(ids)))


def completed_ids(path: Path) -> set[str]:
    """Ids already in the output file; a torn (unterminated) last line is removed.

    Any other line that is not one of our results stops the job, naming the line: resuming
    past it would guess which requests are done.
    """
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    ids = set()
    for number, line in enumerate(keep.splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError as err:  # bad JSON or bad UTF-8
            raise ValueError(f"{path}:{number}: not a result line ({err}); fix or remove it to resume") from None
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f'{path}:{number}: not a result line (no "id"); fix or remove it to resume')
        ids.add(str(record["id"]))
    if len(keep) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return ids


def run_job(
    model: Gemma,
    input_path: Path,
    output_path: Path,
    *,
    slots: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int = 0,
    strict: bool = False,
    write: bool = True,
    report: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[Finished], None] | None = None,
    page_size: int = 32,
    kv_tokens: int | None = None,
) -> JobSummary:
    """Generate a completion for every input id not yet in the output file (`page_size`, `kv_tokens`: the
    engine's paged KV cache)."""
    if not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots (--batch-size) must be a positive integer, got {slots!r}")
    check_max_new_tokens(max_new_tokens)
    check_seed(seed)
    sampler = Sampler.create(temperature, None, top_p)
    requests, rejected = read_requests(model, input_path, max_new_tokens=max_new_tokens, strict=strict, report=report)
    with results_file(output_path, input_path, [r.id for r in requests], write) as (out, done):
        todo = sorted((r for r, d in zip(requests, done) if not d), key=lambda r: len(r.prompt))  # bucket-friendly
        summary = JobSummary(0, len(requests) - len(todo), rejected, 0, 0)
        if on_start is not None:
            on_start(len(todo))
        if not todo:
            return summary
        max_len = min(model.config.max_position, bucket(max(len(r.prompt) for r in todo)) + bucket(max_new_tokens))
        engine = Engine(
            model, slots=slots, max_len=max_len, sampler=sampler, temperature=temperature or 1.0,
            top_p=top_p or 1.0, seed=seed, stop_ids=model.stop_ids(), page_size=page_size,
            kv_tokens=None if kv_tokens is None else max(kv_tokens, max_len),
        )  # fmt: skip
        for result in _flushing(engine.run(todo), out) if write else engine.run(todo):
            text = model.tokenizer.decode(result.tokens)
            line = dict(id=result.id, completion=text, prompt_tokens=result.prompt_tokens,
                        completion_tokens=len(result.tokens), finish_reason=result.finish_reason)  # fmt: skip
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            summary.done += 1
            summary.prompt_tokens += result.prompt_tokens
            summary.completion_tokens += len(result.tokens)
            if on_result is not None:
                on_result(result)
    return summary


@contextlib.contextmanager
def results_file(output_path: Path, input_path: Path, ids: list[str], write: bool) -> Iterator[tuple[IO[str], np.ndarray]]:
    """(the output file opened for appending, which of `ids` it already holds), the same on every process.

    Without `write` (processes other than the writer) the file is /dev/null, and what is done
    comes from the writer (process 0).
    """
    with _open_output(output_path, input_path) if write else open(os.devnull, "w") as out:
        done_before = completed_ids(output_path) if write else set()
        yield out, from_leader(np.array([i in done_before for i in ids], bool))  # the writer's file decides


def make_durable(out: IO[str]) -> None:
    """What was written to `out` is on disk before the job goes on (a kill then loses nothing written)."""
    out.flush()
    os.fsync(out.fileno())


def _open_output(path: Path, input_path: Path):
    """The output file, opened for appending before any work; one that cannot be written is a one-line error."""
    if path.exists() and input_path.exists() and os.path.samefile(path, input_path):
        raise ValueError(f"{path}: the output file is the input file; write the results to another file")
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as err:
        raise ValueError(f"{path}: cannot write the output: {err.strerror}") from None


def _flushing(results: Iterator[Finished], out) -> Iterator[Finished]:
    """Pass results through, making what was written durable before the engine decodes on."""
    for result in results:
        yield result
        make_durable(out)
