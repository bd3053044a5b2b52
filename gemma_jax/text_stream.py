"""Text as it is generated: decoding each row's new tokens, streaming the text that is final, and
cutting rows at stop strings (tokens and text agree). Shared by `Gemma.complete` and the server."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from gemma_jax.tokenizer import Tokenizer


class TextWatcher:
    """Host side of generation: decodes each row's tokens as they arrive, streams text, spots stop strings."""

    def __init__(self, tokenizer: Tokenizer, rows: int, stop: Sequence[str], stream: Callable[[int, str], None] | None):
        self.tokenizer, self.stop, self.stream = tokenizer, list(stop), stream
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [0] * rows  # characters already streamed per row

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """tokens: [B n] new ids, -1 where a row emitted nothing. Returns rows that hit a stop string."""
        stop = np.zeros(len(tokens), bool)
        for row, new in enumerate(tokens):
            new = new[new >= 0]
            if not len(new):
                continue
            self.ids[row].extend(new.tolist())
            text = self.tokenizer.decode(self.ids[row])
            stop[row] = stop_index(text, self.stop) < len(text)
            self._send(row, text[: streamable(text, self.stop)])
        return stop

    def finish(self, texts: Sequence[str]) -> None:
        """Stream whatever each row's final text still holds back."""
        for row, text in enumerate(texts):
            self._send(row, text)

    def _send(self, row: int, text: str) -> None:
        if self.stream is not None and len(text) > self.sent[row]:
            self.stream(row, text[self.sent[row] :])
            self.sent[row] = len(text)


def stop_index(text: str, stop: Sequence[str]) -> int:
    """Where the first stop string begins in `text` (len(text) if none does)."""
    return min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))


def streamable(text: str, stop: Sequence[str]) -> int:
    """How much of `text` is final: up to the first stop string, and short of a tail that the next
    tokens may still turn into one (a stop string's prefix) or into a character (a partial UTF-8
    sequence decodes as up to 3 U+FFFD; 4 or more are real)."""
    partial = [len(text) - k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])]
    pending = len(text) - len(text.rstrip("\ufffd"))
    return min(stop_index(text, stop), *partial, len(text) - pending if pending < 4 else len(text))


def until_stop(tokenizer: Tokenizer, tokens: list[int], stop: Sequence[str]) -> tuple[str, list[int]]:
    """A row's text, cut before its first stop string, and the tokens that made that text.

    Decoding runs on in chunks past a stop string; the tokens after it are dropped, so that the
    tokens decode to the text (plus the stop string's start, if it begins inside a token).
    """
    text = tokenizer.decode(tokens)
    end = stop_index(text, stop)
    if end == len(text):
        return text, tokens
    kept = len(tokens)
    while kept and tokenizer.decode(tokens[: kept - 1]).startswith(text[:end]):
        kept -= 1
    return text[:end], tokens[:kept]
