"""Classifier checkpoints at work: `Gemma.scores` / `Gemma.classify`, and the `gemma-jax classify` job.

Scores come from `Gemma.logits` (the decoder with its classification head, see models/heads.py),
so they are batching- and padding-invariant exactly as logits are; a sequence classifier then
reads each row's score at the token transformers pools (`heads.pool_index`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gemma_jax.infer import make_durable, read_records, results_file
from gemma_jax.models.heads import REGRESSION, SEQUENCE, Head, pool_index

if TYPE_CHECKING:
    from gemma_jax.api import Gemma

Inputs = Sequence[str] | Sequence[Sequence[int]]


def encode(model: Gemma, inputs: Inputs) -> list[list[int]]:
    """Token ids of each input: a text is encoded with <bos> (as transformers' Gemma tokenizer does), ids pass as given."""
    if isinstance(inputs, str) or not len(inputs):
        raise ValueError("inputs must be a non-empty list of texts or of token-id lists (wrap a single one in a list)")
    if not all(isinstance(x, str) for x in inputs):
        if any(isinstance(x, str) for x in inputs):
            raise ValueError("mixing texts and token-id lists in one call is not supported")
        return [list(map(int, x)) for x in inputs]
    if model.tokenizer is None:
        raise ValueError("texts need a tokenizer, and this checkpoint has no tokenizer.model")
    if not all(inputs):
        raise ValueError("empty text")
    return [model.tokenizer.encode(text, add_bos=True) for text in inputs]


def require_classifier(model: Gemma) -> Head:
    """The model's classification head; a causal LM is refused."""
    if model.config.head.is_lm:
        raise ValueError("this checkpoint is a causal LM (no classification head); classify needs a "
                         "*ForSequenceClassification or *ForTokenClassification checkpoint")  # fmt: skip
    return model.config.head


def scores(model: Gemma, inputs: Inputs) -> np.ndarray | list[np.ndarray]:
    """Raw float32 head outputs: [B L] for a sequence classifier, one [T_i L] per row for a token classifier."""
    head = require_classifier(model)
    rows = encode(model, inputs)
    logits = model.logits(rows)  # [B T L], right-padded
    if head.task != SEQUENCE:
        return [logits[i, : len(r)] for i, r in enumerate(rows)]
    tokens = np.full(logits.shape[:2], model.config.pad_id, np.int64)
    valid = np.zeros(logits.shape[:2], bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], valid[i, : len(r)] = r, True
    index = np.asarray(pool_index(tokens, valid, model.config.pad_id if head.pad_token else None))
    return logits[np.arange(len(rows)), index]


def probabilities(model: Gemma, inputs: Inputs) -> np.ndarray | list[np.ndarray]:
    """What the head's problem type makes of the scores: softmax, sigmoid or (regression) the scores themselves."""
    out = scores(model, inputs)
    to_probs = lambda s: np.asarray(model.config.head.probabilities(s))  # noqa: E731
    return to_probs(out) if isinstance(out, np.ndarray) else [to_probs(s) for s in out]


def describe(head: Head, probs: np.ndarray) -> dict[str, Any]:
    """One row's result: the label with the highest score (not for regression) and every label's value."""
    values = {label: float(p) for label, p in zip(head.labels, probs)}
    out: dict[str, Any] = {"scores": values}
    if head.problem_type != REGRESSION:
        out["label"] = head.labels[int(np.argmax(probs))]
    return out


# --- the `gemma-jax classify` job ------------------------------------------------------------


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
