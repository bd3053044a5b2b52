"""Classifier checkpoints at work: `Gemma.scores` / `Gemma.classify` (the job is classify_job.py).

Scores come from `Gemma.logits` (the decoder with its classification head, see models/heads.py),
so they are batching- and padding-invariant exactly as logits are; a sequence classifier then
reads each row's score at the token transformers pools (`heads.pool_index`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

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
