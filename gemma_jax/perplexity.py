"""Perplexity of a text, measured the way llama.cpp's `llama-perplexity` measures it.

llama.cpp tokenizes the whole text (with BOS), cuts it into consecutive chunks of `ctx`
tokens (dropping the remainder), puts BOS in each chunk's first slot, and scores only the
second half of each chunk: positions ctx/2 .. ctx-2 predicting the next token, so every
scored token has at least ctx/2 tokens of context. Same method, same numbers to compare.

With `stride`, windows of `ctx` tokens start every `stride` tokens and each scores only its
last `stride` predictions (the Hugging Face sliding-window method): more context per token,
more compute.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from gemma_jax.api import Gemma

MIN_CTX = 4  # the smallest window accepted (the llama.cpp method scores ctx - 1 - ctx // 2 predictions of each)


@dataclasses.dataclass
class Perplexity:
    ppl: float
    error: float  # llama.cpp's +/- estimate: ppl * std(nll) / sqrt(n - 1)
    tokens_scored: int
    windows: int


def windows(tokens: list[int], ctx: int, stride: int | None, bos: int) -> tuple[np.ndarray, int]:
    """[W ctx] token windows and how many trailing predictions of each are scored.

    It needs only the tokenizer, so a text too short for `ctx` fails before the weights load.
    """
    if ctx < MIN_CTX:
        raise ValueError(f"--ctx must be at least {MIN_CTX}, got {ctx}")
    if stride is None:  # llama.cpp: disjoint chunks, BOS first, score the second half
        n = len(tokens) // ctx
        if n < 1 or len(tokens) < 2 * ctx:
            raise ValueError(f"the text has {len(tokens)} tokens; --ctx {ctx} needs at least {2 * ctx} (as llama.cpp)")
        chunks = np.asarray(tokens[: n * ctx], np.int32).reshape(n, ctx)
        chunks[:, 0] = bos
        return chunks, ctx - 1 - ctx // 2
    if not 0 < stride <= ctx - 1:
        raise ValueError(f"--stride must be in [1, ctx-1], got {stride}")
    if len(tokens) < ctx:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than --ctx {ctx}")
    starts = range(0, len(tokens) - ctx + 1, stride)
    return np.asarray([tokens[s : s + ctx] for s in starts], np.int32), stride


def perplexity(
    model: Gemma,
    text: str,
    *,
    ctx: int = 512,
    stride: int | None = None,
    batch: int = 1,
    progress: Callable[[int, int, float], None] | None = None,
) -> Perplexity:
    """Perplexity of `text` under `model`; `progress(windows_done, windows, running_ppl)` after each batch."""
    if model.tokenizer is None:
        raise ValueError("perplexity needs a tokenizer, and this checkpoint has no tokenizer.model")
    chunks, scored = windows(model.tokenizer.encode(text, add_bos=True), ctx, stride, model.tokenizer.bos_id)
    return score_windows(model, chunks, scored, batch=batch, progress=progress)


def score_windows(
    model: Gemma,
    chunks: np.ndarray,
    scored: int,
    *,
    batch: int = 1,
    progress: Callable[[int, int, float], None] | None = None,
) -> Perplexity:
    """Perplexity over the last `scored` predictions of each window of `windows`, `batch` windows per forward pass."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {batch!r}")
    nll: list[np.ndarray] = []
    for start in range(0, len(chunks), batch):
        rows = chunks[start : start + batch]
        full = np.resize(rows, (batch, chunks.shape[1]))  # the last batch repeats rows: one compiled shape
        logp = model.token_logprobs(full)[: len(rows)]  # [b, ctx-1]
        nll.append(-logp[:, -scored:].astype(np.float64).ravel())
        if progress is not None:
            progress(start + len(rows), len(chunks), math.exp(np.concatenate(nll).mean()))
    values = np.concatenate(nll)
    mean = values.mean()
    error = math.exp(mean) * values.std() / math.sqrt(max(len(values) - 1, 1))
    return Perplexity(math.exp(mean), error, len(values), len(chunks))
