"""Gemma tokenizer: a sentencepiece model plus Gemma's special-token and chat conventions.

Sentencepiece treats `<bos>`, `<eos>` and `<pad>` as control symbols, so encoding the text "<bos>"
yields the characters, not the id. Gemma's chat format is written as text containing those
markers, so `Tokenizer.encode` maps every special-token string to its id itself; the chat
template then only has to produce a string.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import sentencepiece as spm

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
# Strings that `encode` maps to single ids wherever they occur in the text.
SPECIAL_PIECES = (BOS, EOS, PAD, START_OF_TURN, END_OF_TURN)
# Chat roles as written in Gemma's template ("assistant" is the Hugging Face spelling of "model").
_TURN_ROLES = {"user": "user", "assistant": "model", "model": "model"}


class Tokenizer:
    """A Gemma sentencepiece tokenizer, built from a serialized `ModelProto`.

    Taking bytes rather than a path lets a tokenizer embedded elsewhere (e.g. in a GGUF file)
    be used without a temporary file; `from_file` is the usual entry point.
    """

    def __init__(self, model_proto: bytes) -> None:
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except RuntimeError as e:
            raise ValueError(f"not a valid sentencepiece model ({e})") from e
        # Batching and the chat format need these, under Gemma's names.
        required = ((BOS, self.bos_id), (EOS, self.eos_id), (PAD, self.pad_id))
        missing = [p for p, i in required if i < 0 or self._sp.id_to_piece(i) != p]
        if missing:
            raise ValueError(f"not a Gemma tokenizer: no {', '.join(missing)} token")
        self._special_ids = {p: i for p in SPECIAL_PIECES if (i := self._piece_id(p)) is not None}
        # Longest first, so no special string is cut short by another that is its prefix.
        alternatives = sorted(self._special_ids, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Loads a `tokenizer.model` file, with errors that name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        try:
            return cls(path.read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def _piece_id(self, piece: str) -> int | None:
        # piece_to_id answers unk_id for unknown pieces, so check the round trip instead.
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    @property
    def model_proto(self) -> bytes:
        """The serialized sentencepiece ModelProto (what tokenizer.model holds)."""
        return self._sp.serialized_model_proto()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def start_of_turn_id(self) -> int | None:
        return self._special_ids.get(START_OF_TURN)

    @property
    def end_of_turn_id(self) -> int | None:
        return self._special_ids.get(END_OF_TURN)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, with special-token strings (e.g. "<bos>") mapped to their ids."""
        try:  # sentencepiece takes UTF-8: a lone surrogate (JSON "\\ud800", an undecodable argv byte) fails in C++
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            bad = f"U+{ord(text[err.start]):04X}"
            raise ValueError(f"text is not valid UTF-8: character {err.start} is a lone surrogate, {bad}") from None
        ids = [self.bos_id] if add_bos else []
        # re.split with a capturing group alternates plain text (even) and special strings (odd).
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self._sp.encode(part))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control tokens (pad, bos, eos) are dropped, as sentencepiece does."""
        return self._sp.decode([int(i) for i in ids])

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_bos: bool = True,
        pad_to: int | None = None,
        padding_side: Literal["left", "right"] = "right",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes `texts` into `(ids, mask)`, both `[batch, length]`, padded with `pad_id`.

        `length` is the longest text's, or `pad_to` when given (fixed shapes avoid recompiling
        jitted code). Left padding keeps every prompt's last token in the last column, which is
        what batched generation wants. `mask` is True on real tokens.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        seqs = [self.encode(t, add_bos=add_bos) for t in texts]
        length = max(map(len, seqs), default=0) if pad_to is None else pad_to
        ids = np.full((len(seqs), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(seqs), length), dtype=np.bool_)
        for b, seq in enumerate(seqs):
            if len(seq) > length:
                raise ValueError(f"text {b} is {len(seq)} tokens long, more than pad_to={pad_to}")
            cols = slice(length - len(seq), length) if padding_side == "left" else slice(0, len(seq))
            ids[b, cols] = seq
            mask[b, cols] = True
        return ids, mask

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Renders a conversation in Gemma's chat format, as the official Hugging Face template does.

        Gemma has no system turn: like Gemma 3's template, a leading system message is prepended
        to the first user message, separated by a blank line (and, as there, not trimmed). With `add_generation_prompt` the
        text ends by opening a model turn, for the model to complete.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: expected a dict with a string 'content', got {m!r}")
            if m.get("role") not in ("system", *_TURN_ROLES):
                raise ValueError(f"message {i}: unknown role {m.get('role')!r}")
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        offset = len(messages) - len(turns)
        if not turns:
            raise ValueError("message 1: a system message must be followed by a user message")
        text = BOS
        for k, m in enumerate(turns):
            if m["role"] == "system":
                raise ValueError(f"message {k + offset}: a system message is only allowed first")
            role = _TURN_ROLES[m["role"]]
            if role != ("user" if k % 2 == 0 else "model"):
                expected = "user" if k % 2 == 0 else "assistant/model"
                raise ValueError(f"message {k + offset}: expected role {expected}, got {m['role']!r}")
            prefix = system + "\n\n" if k == 0 and system is not None else ""
            text += f"{START_OF_TURN}{role}\n{prefix}{m['content'].strip()}{END_OF_TURN}\n"
        if add_generation_prompt:
            text += f"{START_OF_TURN}model\n"
        return text

    def encode_chat(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation; it starts with the bos id (from the "<bos>" text)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))


def train_sentencepiece(texts: Iterable[str], model_path: str | os.PathLike[str], *, vocab_size: int) -> Tokenizer:
    """Trains a small tokenizer laid out like Gemma's and writes it to `model_path`.

    For tests and toy checkpoints: same special ids (pad 0, eos 1, bos 2, unk 3), turn markers,
    byte fallback (no text is ever unknown), one token per digit, and text kept verbatim (no
    normalization, no dummy prefix, whitespace runs as pieces). Each text is one training
    sentence; newlines inside it are learned as pieces. The file is replaced atomically.
    """
    sentences = [t for t in texts if t]
    if not sentences:
        raise ValueError("no training text")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece=PAD, eos_piece=EOS, bos_piece=BOS, unk_piece=UNK,
        user_defined_symbols=[START_OF_TURN, END_OF_TURN],
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        # Longer sentences (default limit 4192 bytes) would be dropped without a word.
        max_sentence_length=max(4192, *(len(s.encode()) for s in sentences)),
        minloglevel=2,
    )
    tokenizer = Tokenizer(model.getvalue())
    path = Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace is an atomic rename: readers never see a partial file.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        staged.write_bytes(model.getvalue())
        os.replace(staged, path)
    return tokenizer
