"""`gemma-jax classify`: JSONL lines in, a classifier's labels and probabilities out, on infer's job machinery."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gemma_jax.api import Gemma
from gemma_jax.classify import describe, probabilities, require_classifier
from gemma_jax.infer import make_durable, read_records, results_file
from gemma_jax.models.heads import SEQUENCE


@dataclasses.dataclass
class ClassifySummary:
    done: int  # lines classified by this run
    skipped: int  # ids already in the output
    rejected: int  # bad input lines
    tokens: int  # input tokens classified


@dataclasses.dataclass(frozen=True)
class _Line:
    id: str
    ids: list[int]


def run_classify_job(
    model: Gemma,
    input_path: Path,
    output_path: Path,
    *,
    batch_size: int,
    strict: bool = False,
    write: bool = True,
    report: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ClassifySummary:
    """Classify every `{"id", "text"}` line (or `{"id", "ids": [...]}`) not yet in the output file.

    Restartable and tolerant of bad lines exactly as `gemma-jax infer` (it is infer's job
    machinery): each batch's results are appended and made durable before the next batch runs.
    Output lines: `{"id", "label", "scores": {label: probability}}` for a sequence classifier
    (regression: no "label", raw scores); `{"id", "tokens": [piece, ...], "labels": [...],
    "scores": [{label: probability}, ...]}` for a token classifier, one entry per token after <bos>.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size (--batch-size) must be a positive integer, got {batch_size!r}")
    require_classifier(model)  # before the input is read
    parse = lambda rid, record: _parse_line(model, rid, record)  # noqa: E731
    lines, rejected = read_records(input_path, parse, strict=strict, report=report, nothing_done="nothing was classified")
    with results_file(output_path, input_path, [line.id for line in lines], write) as (out, done):
        todo = sorted((line for line, d in zip(lines, done) if not d), key=lambda line: len(line.ids))  # similar lengths together
        summary = ClassifySummary(0, len(lines) - len(todo), rejected, 0)
        if on_start is not None:
            on_start(len(todo))
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for line, probs in zip(batch, probabilities(model, [line.ids for line in batch])):
                out.write(json.dumps({"id": line.id, **_result(model, line.ids, probs)}, ensure_ascii=False) + "\n")
                summary.tokens += len(line.ids)
            if write:
                make_durable(out)
            summary.done += len(batch)
            if on_batch is not None:
                on_batch(len(batch))
    return summary


def _parse_line(model: Gemma, rid: str, record: dict[str, Any]) -> _Line:
    if isinstance(record.get("text"), str) and record["text"]:
        if model.tokenizer is None:
            raise ValueError('"text" needs a checkpoint with a tokenizer; give token "ids" instead')
        ids = model.tokenizer.encode(record["text"], add_bos=True)
    elif isinstance(record.get("ids"), list) and record["ids"]:
        ids = record["ids"]
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < model.config.vocab_size for t in ids):
            raise ValueError(f'"ids" must be token ids in [0, {model.config.vocab_size})')
    else:
        raise ValueError('needs a non-empty "text" string or "ids" list')
    if len(ids) > model.config.max_position:
        raise ValueError(f"{len(ids)} tokens do not fit the context of {model.config.max_position}")
    return _Line(rid, ids)


def _result(model: Gemma, ids: list[int], probs: np.ndarray) -> dict[str, Any]:
    head = model.config.head
    if head.task == SEQUENCE:
        return describe(head, probs)
    first = 1 if ids[0] == model.config.bos_id else 0
    per_token = [describe(head, p) for p in probs[first:]]
    pieces = [model.tokenizer.decode([t]) if model.tokenizer else str(t) for t in ids[first:]]
    return {"tokens": pieces, "labels": [r["label"] for r in per_token], "scores": [r["scores"] for r in per_token]}
