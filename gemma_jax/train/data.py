"""Training data: JSONL records -> token ids with loss weights -> packed fixed-length rows -> batches.

Each document becomes (input, target) pairs: token t predicts token t+1 of the same document,
so packing several documents into one row never asks a token to predict the next document.
Every packed document gets its own segment id (1, 2, ...; 0 = padding) and positions that
restart at 0, so attention and RoPE never cross documents (the model masks by segment).

Classifier records (`models/heads.py`) carry labels instead: `{"text", "label"}` (sequence
classification: the target is the label, at the last token, where the score is pooled) and
`{"tokens": [words], "labels": [...]}` (token classification: each word's label at its first
token, as transformers' token classifiers are trained); their targets are not shifted.

Chat records (`{"messages": [...]}`) are rendered with the tokenizer's chat template, and only
the model turns (their text and closing `<end_of_turn>`) carry loss. Each model turn is
tokenized on its own after the `<start_of_turn>model\\n` header, exactly as the model sees a
prompt at generation time and then produces the reply.

Batches are a pure function of (rows, seed, step): the row stream is the concatenation of one
seeded permutation per epoch, and step k takes the k-th slice of it. The data iterator's
position is therefore the step count, and resuming at step k reproduces every later batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from gemma_jax.models.heads import SEQUENCE, SINGLE, Head
from gemma_jax.tokenizer import END_OF_TURN, Tokenizer

T = TypeVar("T")
Batch = dict[str, np.ndarray]  # ROW_FIELDS -> [rows, seq_len]
ROW_FIELDS = ("inputs", "targets", "weights", "positions", "segments")
_MODEL_ROLES = ("assistant", "model")


@dataclasses.dataclass(frozen=True)
class Example:
    """One document's token ids and, per token, whether it is a loss target (1.0) or context (0.0)."""

    ids: np.ndarray  # [n] int32
    weights: np.ndarray  # [n] float32; weights[0] is never used (the first token predicts nothing before it)
    targets: np.ndarray | None = None  # [n] int32 labels of a classifier's tokens (weights then index ids, unshifted)


def encode_record(record: Mapping[str, Any], tokenizer: Tokenizer, head: Head = Head()) -> Example:
    """A JSONL record -> Example. Text: bos + text + eos, all targets. Chat: loss on model turns only.
    A classifier's record: see the module docstring."""
    if not head.is_lm:
        return _labelled_example(record, tokenizer, head)
    if isinstance(record.get("text"), str):
        ids = tokenizer.encode(record["text"], add_bos=True, add_eos=True)
        return Example(np.asarray(ids, np.int32), np.ones(len(ids), np.float32))
    if "messages" in record:
        return _chat_example(record["messages"], tokenizer)
    raise ValueError('expected {"text": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}')


def _chat_example(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer) -> Example:
    """Encode the rendered conversation piece by piece, weighting model turns; drops text after the last one.

    The rendering of messages[:k] with a generation prompt is a prefix of the full rendering,
    so model turn k spans from that prefix's end to its closing `<end_of_turn>`.
    """
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)  # also validates the roles
    ids: list[int] = []
    weights: list[float] = []
    done = 0
    for k, message in enumerate(messages):
        if message["role"] not in _MODEL_ROLES:
            continue
        start = len(tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True))
        upto = tokenizer.apply_chat_template(messages[: k + 1], add_generation_prompt=False)
        end = upto.rindex(END_OF_TURN) + len(END_OF_TURN)
        for text, weight in ((full[done:start], 0.0), (full[start:end], 1.0)):
            piece = tokenizer.encode(text)
            ids += piece
            weights += [weight] * len(piece)
        done = end
    return Example(np.asarray(ids, np.int32), np.asarray(weights, np.float32))


def record_labels(record: Mapping[str, Any], task: str) -> list[str]:
    """The label names of a classifier's training record: [label] (sequence) or one per word (token)."""
    if task == SEQUENCE:
        if not isinstance(record.get("text"), str) or not record["text"] or "label" not in record:
            raise ValueError('expected {"text": "...", "label": ...} (a non-empty text and its label)')
        values = [record["label"]]
    else:
        words, values = record.get("tokens"), record.get("labels")
        if not isinstance(words, list) or not isinstance(values, list) or not words or len(words) != len(values):
            raise ValueError('expected {"tokens": [words], "labels": [one label per word]}, non-empty and of equal length')
        if not all(isinstance(w, str) and w for w in words):
            raise ValueError('"tokens" must be non-empty strings')
    bad = [v for v in values if not isinstance(v, (str, int)) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"a label must be a name or an integer, got {bad[0]!r}")
    return [str(v) for v in values]


def _labelled_example(record: Mapping[str, Any], tokenizer: Tokenizer, head: Head) -> Example:
    """A classifier's example: bos + text (no eos, as classify encodes it), targets at the scored tokens."""
    if head.problem_type != SINGLE:
        raise ValueError(f"fine-tuning trains {SINGLE} heads; this head's problem_type is {head.problem_type}")
    index = {label: i for i, label in enumerate(head.labels)}
    labels = record_labels(record, head.task)
    unknown = [label for label in labels if label not in index]
    if unknown:
        raise ValueError(f"label {unknown[0]!r} is not one of the head's labels {list(head.labels)}")
    if head.task == SEQUENCE:
        pieces = [tokenizer.encode(record["text"], add_bos=True)]
    else:  # each word with the space before it, so that the words read as the text " ".join(words)
        pieces = [[tokenizer.bos_id]] + [tokenizer.encode(w if i == 0 else " " + w) for i, w in enumerate(record["tokens"])]
    ids = [t for piece in pieces for t in piece]
    targets, weights = np.zeros(len(ids), np.int32), np.zeros(len(ids), np.float32)
    if head.task == SEQUENCE:
        targets[-1], weights[-1] = index[labels[0]], 1.0  # the token transformers pools
    else:
        starts = np.cumsum([0] + [len(piece) for piece in pieces[:-1]])[1:]  # each word's first token
        targets[starts], weights[starts] = [index[label] for label in labels], 1.0
    return Example(np.asarray(ids, np.int32), weights, targets)


def read_examples(path: str | Path, tokenizer: Tokenizer, head: Head = Head()) -> list[Example]:
    """Every record of a JSONL file, encoded; errors name the file and line."""
    return _per_record(path, lambda record: encode_record(record, tokenizer, head))


def read_labels(path: str | Path, task: str) -> tuple[str, ...]:
    """The distinct labels of a classifier's training file, sorted: a new head's labels."""
    return tuple(sorted({label for labels in _per_record(path, lambda r: record_labels(r, task)) for label in labels}))


def _per_record(path: str | Path, fn: Callable[[Any], T]) -> list[T]:
    """fn(record) of every JSONL record of `path`; an error names the file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(fn(json.loads(line)))
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{number}: {e}") from e
    if not out:
        raise ValueError(f"{path}: no records")
    return out


@dataclasses.dataclass(frozen=True)
class Rows:
    """Packed rows: each field [R, seq_len]. `weights` is 0 on padding and on non-target tokens."""

    inputs: np.ndarray  # int32 token ids fed to the model
    targets: np.ndarray  # int32 the next token of the same document
    weights: np.ndarray  # float32 loss weight of each target
    positions: np.ndarray  # int32, restarting at 0 for each document
    segments: np.ndarray  # int32 document number within the row (1, 2, ...); 0 = padding

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, index: np.ndarray) -> Batch:
        return {name: getattr(self, name)[index] for name in ROW_FIELDS}

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the packed data: a resumed run checks it is reading what the checkpoint read."""
        digest = hashlib.sha256()
        for name in ROW_FIELDS:
            digest.update(np.ascontiguousarray(getattr(self, name)).tobytes())
        return digest.hexdigest()[:16]


def pack(examples: Sequence[Example], seq_len: int) -> Rows:
    """Greedy, order-preserving packing of documents into rows of `seq_len` (input, target) pairs.

    A document of n tokens gives n - 1 pairs; longer than `seq_len`, it is cut into pieces that
    each start a new segment at position 0. A piece that does not fit the current row's space
    starts a new row (documents are never split across rows otherwise). Documents without any
    loss-carrying target are dropped.
    """
    pieces = []  # (inputs, targets, weights) of at most seq_len tokens
    for ex in examples:
        if ex.targets is not None:  # a classifier's: unshifted, and never cut (its label needs the whole text)
            if len(ex.ids) > seq_len:
                raise ValueError(f"a classification example of {len(ex.ids)} tokens is longer than seq_len={seq_len}")
            pieces.append((ex.ids, ex.targets, ex.weights))
            continue
        if len(ex.ids) < 2 or not ex.weights[1:].any():
            continue
        for s in range(0, len(ex.ids) - 1, seq_len):
            ids = ex.ids[s : s + seq_len + 1]
            pieces.append((ids[:-1], ids[1:], ex.weights[s + 1 : s + seq_len + 1]))
    if not pieces:
        raise ValueError("no document has a token to learn (need >= 2 tokens, and a model turn for chat)")
    rows: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[]]
    free = seq_len
    for piece in pieces:
        if len(piece[0]) > free:
            rows.append([])
            free = seq_len
        rows[-1].append(piece)
        free -= len(piece[0])
    out = {name: np.zeros((len(rows), seq_len), np.float32 if name == "weights" else np.int32) for name in ROW_FIELDS}
    for r, row in enumerate(rows):
        col = 0
        for segment, (inputs, targets, weights) in enumerate(row, 1):
            n = len(inputs)
            cols = slice(col, col + n)
            out["inputs"][r, cols], out["targets"][r, cols] = inputs, targets
            out["weights"][r, cols], out["positions"][r, cols], out["segments"][r, cols] = weights, np.arange(n), segment
            col += n
    return Rows(**out)


def load_rows(path: str | Path, tokenizer: Tokenizer, seq_len: int, head: Head = Head()) -> Rows:
    return pack(read_examples(path, tokenizer, head), seq_len)


class Batches:
    """Training batches as a pure function of the step (see the module docstring): resumable by design."""

    def __init__(self, rows: Rows, batch_size: int, seed: Sequence[int]):
        self.rows, self.batch_size, self.seed = rows, batch_size, tuple(int(s) for s in seed)
        self._order = functools.lru_cache(maxsize=2)(self._permutation)  # a step spans at most a few epochs

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((*self.seed, epoch)).permutation(len(self.rows))

    def __call__(self, step: int) -> Batch:
        """The rows of optimizer step `step` (0-based): [batch_size, seq_len] per field."""
        stream = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, index = np.divmod(stream, len(self.rows))
        return self.rows.take(np.asarray([self._order(int(e))[i] for e, i in zip(epochs, index)]))


def eval_batches(rows: Rows, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
    """The eval rows in order, `batch_size` at a time; the last batch is padded with empty (weight 0) rows."""
    count = math.ceil(len(rows) / batch_size)
    for b in range(count if limit is None else min(count, limit)):
        index = np.arange(b * batch_size, (b + 1) * batch_size)
        batch = rows.take(np.minimum(index, len(rows) - 1))
        empty = index >= len(rows)
        batch["weights"][empty], batch["segments"][empty] = 0.0, 0
        yield batch
