"""Task heads on a decoder: what a checkpoint's last layer computes, shared by every model family.

A head is a small addition to a family, not a new model: the decoder runs unchanged up to its
final norm, then either the tied embedding gives vocabulary logits (the causal LM) or a `score`
projection gives one score per label, as transformers' `*ForSequenceClassification` (no bias)
and `*ForTokenClassification` (bias unless `token_classification_bias` is false) do. Scores are
never soft-capped (transformers caps only the LM's logits).

Sequence classification pools the scores of one token per row, chosen as transformers does: the
rightmost token whose id is not the config's `pad_token_id`. We know each row's real length, so
the rule is applied to the real tokens only, which makes it independent of padding and batching;
it differs from transformers only where a row holds nothing but pad ids (transformers then takes
position 0, which in a left-padded batch is padding; we take the row's first token). Without a
pad token transformers refuses batches of more than one row and takes the last token; each row
then gets its last real token, which is what transformers gives it alone.

Labels (`id2label`) and the problem type (single-label, multi-label, regression) live in
config.json (`Head.from_hf` / `to_hf`). Fine-tuning trains single-label heads with
transformers' loss, cross-entropy at the scored tokens (train/data.py places the labels there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from gemma_jax.kernels import Kernels
from gemma_jax.layers import project
from gemma_jax.models.family import ConfigError

Array = jax.Array

CAUSAL_LM, SEQUENCE, TOKEN = "causal-lm", "sequence-classification", "token-classification"
TASKS = (CAUSAL_LM, SEQUENCE, TOKEN)
SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
PROBLEM_TYPES = (SINGLE, MULTI, REGRESSION)
_HF_SUFFIX = {SEQUENCE: "ForSequenceClassification", TOKEN: "ForTokenClassification"}
# transformers' class-name prefix per model_type (Gemma 3's text-only classifier is "Gemma3Text...").
_HF_PREFIX = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3Text"}
_HF_HAS = {("gemma3_text", TOKEN): False}  # transformers 5.24 ships no Gemma 3 token classifier
HEAD_KEY = "score"  # the head's subtree in a params tree
SCORE_AXES = ("labels", "embed")
INIT_STD = 0.02  # transformers' initializer_range: how a new head starts


@dataclasses.dataclass(frozen=True)
class Head:
    """What the decoder's last layer computes. Frozen and hashable: part of the (static) model config."""

    task: str = CAUSAL_LM
    labels: tuple[str, ...] = ()  # classification: label names, in score order (id2label)
    problem_type: str | None = None  # sequence classification: one of PROBLEM_TYPES
    pad_token: bool = True  # sequence classification: pooling skips trailing pad ids (config.json has a pad_token_id)
    bias: bool = False  # the score projection has a bias (token classification's default)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        if self.task not in TASKS:
            raise ConfigError("task", f"is {self.task!r}, not one of {', '.join(TASKS)}")
        if self.task == CAUSAL_LM:
            if self.labels or self.problem_type or self.bias:
                raise ConfigError("task", "is the causal LM, which has no labels, problem type or score bias")
            return
        if not self.labels:
            raise ConfigError("id2label", f"is empty; a {self.task} head needs at least one label")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("id2label", f"names a label twice: {list(self.labels)}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ConfigError("problem_type", f"is {self.problem_type!r}, not one of {', '.join(PROBLEM_TYPES)}")
        if self.task == TOKEN and self.problem_type != SINGLE:
            raise ConfigError("problem_type", f"is {self.problem_type}, but token classification is {SINGLE} (one label per token)")
        if self.task == SEQUENCE and self.bias:
            raise ConfigError("token_classification_bias", "is set, but transformers' sequence classifiers have no score bias")

    @property
    def is_lm(self) -> bool:
        return self.task == CAUSAL_LM

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @classmethod
    def classifier(cls, task: str, labels: tuple[str, ...], problem_type: str | None = None) -> Head:
        """A new head of `task` with transformers' defaults (single-label, or regression for one label)."""
        problem_type = problem_type or (REGRESSION if len(labels) == 1 and task == SEQUENCE else SINGLE)
        return cls(task, tuple(labels), problem_type, bias=task == TOKEN)

    # --- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Head:
        """The head a config.json describes, from its `architectures` (causal LM unless it names a classifier)."""
        archs = hf.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError("architectures", f"must be a list of class names, got {archs!r}")
        task = next((t for t, suffix in _HF_SUFFIX.items() for a in archs if a.endswith(suffix)), CAUSAL_LM)
        if task == CAUSAL_LM:
            return cls()
        labels = _labels(hf)
        problem_type = hf.get("problem_type")
        if task == SEQUENCE and problem_type is None:  # transformers decides at loss time, from the labels given
            problem_type = REGRESSION if len(labels) == 1 else SINGLE
        if task == TOKEN:
            problem_type = problem_type or SINGLE
        bias = task == TOKEN and hf.get("token_classification_bias", True) is not False
        return cls(task, labels, problem_type, pad_token=hf.get("pad_token_id") is not None, bias=bias)

    def architecture(self, model_type: str) -> str | None:
        """transformers' class name for this head on `model_type` (None: the causal LM's, the family's own)."""
        if self.is_lm:
            return None
        if not _HF_HAS.get((model_type, self.task), True) or model_type not in _HF_PREFIX:
            raise ConfigError("architectures", f"names no model transformers has: no {self.task} model for model_type {model_type!r}")
        return _HF_PREFIX[model_type] + _HF_SUFFIX[self.task]

    def to_hf(self, model_type: str) -> dict[str, Any]:
        """The config.json keys of this head, over the family's causal-LM config (empty for the causal LM)."""
        if self.is_lm:
            return {}
        hf: dict[str, Any] = {
            "architectures": [self.architecture(model_type)],
            "id2label": {str(i): label for i, label in enumerate(self.labels)},
            "label2id": {label: i for i, label in enumerate(self.labels)},
            "problem_type": self.problem_type,
        }
        if self.task == SEQUENCE and not self.pad_token:
            hf["pad_token_id"] = None
        if self.task == TOKEN:
            hf["token_classification_bias"] = self.bias
        return hf

    # --- outputs ------------------------------------------------------------------------
    def probabilities(self, scores: Array) -> Array:
        """What `classify` reports: softmax (single label), sigmoid (multi-label), raw scores (regression)."""
        if self.problem_type == MULTI:
            return jax.nn.sigmoid(scores)
        if self.problem_type == REGRESSION:
            return scores
        return jax.nn.softmax(scores, axis=-1)


def head_of(value: Head | dict[str, Any]) -> Head:
    """A Head from itself or from its fields as a dict (as `dataclasses.asdict` stores a config)."""
    return value if isinstance(value, Head) else Head(**value)


def _labels(hf: dict[str, Any]) -> tuple[str, ...]:
    """Label names in id order from `id2label` ({"0": "NEG", ...}), else LABEL_i for `num_labels` (default 2)."""
    id2label = hf.get("id2label")
    if id2label is None:
        count = hf.get("num_labels", 2)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError("num_labels", f"must be a positive integer, got {count!r}")
        return tuple(f"LABEL_{i}" for i in range(count))
    if not isinstance(id2label, dict) or not id2label:
        raise ConfigError("id2label", f"must be a non-empty object, got {id2label!r}")
    try:
        ids = sorted(int(k) for k in id2label)
    except (TypeError, ValueError):
        raise ConfigError("id2label", f"keys must be label ids 0..n-1, got {sorted(id2label)!r}") from None
    if ids != list(range(len(ids))):
        raise ConfigError("id2label", f"keys must be label ids 0..n-1, got {ids}")
    by_id = {int(k): v for k, v in id2label.items()}
    if not all(isinstance(v, str) for v in by_id.values()):
        raise ConfigError("id2label", "values must be label names (strings)")
    return tuple(by_id[i] for i in ids)


class Score(nn.Module):
    """transformers' `score` Linear: [.. D] -> float32 [.. labels]. Always float (int8 quantization keeps it)."""

    head: Head
    embed_dim: int
    param_dtype: Any = jnp.float32
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (self.head.num_labels, self.embed_dim)
        init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), SCORE_AXES)
        w = self.param("w", init, shape, self.param_dtype)
        scores = project("...D,LD->...L", x, w.astype(x.dtype), self.kernels, preferred_element_type=jnp.float32)
        if self.head.bias:
            b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, SCORE_AXES[:1]), shape[:1], self.param_dtype)
            scores = scores + b.astype(jnp.float32)
        return scores


def pool_index(tokens: Array, valid: Array, pad_id: int | None) -> Array:
    """[B] the position each row's sequence score is read at (see the module docstring).

    tokens, valid: [B T] (valid: a real token, not batch padding); pad_id None: no pad token.
    """
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    keep = valid if pad_id is None else valid & (tokens != pad_id)
    last = jnp.max(jnp.where(keep, positions, -1), axis=1)
    return jnp.where(last >= 0, last, jnp.argmax(valid, axis=1)).astype(jnp.int32)


def task_head(task: str | None, current: Head, data_labels: Callable[[], tuple[str, ...]]) -> Head:
    """The head a fine-tuning run trains: the checkpoint's own (`task` None or the same), or a new
    classifier of `task` on a causal LM, labelled with `data_labels()` (the training file's)."""
    if task is None or task == current.task:
        return current
    if task not in TASKS:
        raise ConfigError("task", f"is {task!r}, not one of {', '.join(TASKS)}")
    if not current.is_lm:
        raise ConfigError("task", f"is {task}, but the checkpoint is a {current.task} model; fine-tune it as one")
    return Head.classifier(task, data_labels(), SINGLE)


def confusion(scores: Array, targets: Array, weights: Array) -> Array:
    """[L L] weighted counts of (true label, predicted label) over the scored tokens ([.. L] scores, [..] targets)."""
    num_labels = scores.shape[-1]
    truth = jax.nn.one_hot(targets, num_labels) * weights[..., None]
    predicted = jax.nn.one_hot(jnp.argmax(scores, axis=-1), num_labels)
    return jnp.einsum("...t,...p->tp", truth, predicted)


def accuracy_and_f1(counts: Any) -> tuple[float, float]:
    """(accuracy, macro-averaged F1 over the labels that occur as truth or prediction) of a confusion matrix."""
    counts = np.asarray(counts, np.float64)
    total, hits = counts.sum(), np.diag(counts)
    truth, predicted = counts.sum(axis=1), counts.sum(axis=0)
    seen = (truth + predicted) > 0
    f1 = 2 * hits[seen] / (truth[seen] + predicted[seen])
    return float(hits.sum() / max(total, 1.0)), float(f1.mean()) if seen.any() else 0.0


def init_head(head: Head, embed_dim: int, rng: Array, dtype: Any = jnp.float32) -> dict[str, Array]:
    """A new head's params ({"w"[, "b"]}), initialised as transformers initialises one (normal(0.02), zero bias)."""
    return nn.meta.unbox(Score(head, embed_dim, dtype).init(rng, jnp.zeros((1, embed_dim), dtype))["params"])


def head_leaves(params: Any) -> dict[str, Any]:
    """The classification head's subtree of a params-shaped tree, under its key ({} for a causal LM)."""
    return {HEAD_KEY: params[HEAD_KEY]} if HEAD_KEY in params else {}


def without_head(params: Any) -> dict[str, Any]:
    """The decoder's part of a params-shaped tree (a LoRA run trains the head beside the adapters)."""
    return {k: v for k, v in params.items() if k != HEAD_KEY}
