"""Tests for gemma_jax.tokenizer, on a small Gemma-style model trained from the GPL-3 text."""

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from gemma_jax.tokenizer import Tokenizer, train_sentencepiece

CORPUS = Path("/usr/share/common-licenses/GPL-3")
VOCAB_SIZE = 640

CHAT = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "How are you?"},
]
CHAT_TEXT = (
    "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi there<end_of_turn>\n"
    "<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\n"
)

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "The GNU General Public License is a free, copyleft license.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n  mixed \t \n",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "def f(x):\n    return {'a': x ** 2}  # comment\n",
    "Unicode: café, naïve, Ærøskøbing, Ελληνικά, русский",
    "emoji 😀🎉👍🏽 and CJK 日本語 中文 한국어",
    "~`!@#$%^&*()_+-=[]{}|;:'\",.<>/?\\",
    "",
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_sentencepiece(CORPUS.read_text().split("\n\n"), path, vocab_size=VOCAB_SIZE)
    return path


@pytest.fixture(scope="module")
def tok(model_path) -> Tokenizer:
    return Tokenizer.from_file(model_path)


def test_train_is_fast_atomic_and_loadable(tmp_path):
    path = tmp_path / "sub" / "tokenizer.model"
    start = time.perf_counter()
    trained = train_sentencepiece([CORPUS.read_text()], path, vocab_size=1000)  # one long document
    assert time.perf_counter() - start < 5
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.model"]  # no temp dir left behind
    loaded = Tokenizer(path.read_bytes())
    assert trained.vocab_size == loaded.vocab_size == 1000
    text = "This License applies to any program."
    assert trained.encode(text) == loaded.encode(text) == Tokenizer.from_file(str(path)).encode(text)


def test_train_rejects_empty_input(tmp_path):
    with pytest.raises(ValueError, match="no training text"):
        train_sentencepiece(["", ""], tmp_path / "tokenizer.model", vocab_size=512)


def test_special_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (4, 5)
    assert tok.vocab_size == VOCAB_SIZE


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_digits_are_split_and_rare_characters_fall_back_to_bytes(tok):
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    assert len(tok.encode("😀")) == len("😀".encode()) == 4
    assert len(tok.encode("日本")) == 6


def test_whitespace_is_kept_verbatim(tok):
    # No dummy prefix and no whitespace collapsing: every space and newline is encoded.
    assert tok.encode("a") != tok.encode(" a")
    assert tok.decode(tok.encode("\n\n   x  ")) == "\n\n   x  "


def test_special_strings_in_text_become_single_ids(tok, model_path):
    enc = tok.encode
    text = "<bos>Hi<start_of_turn>user\nok<end_of_turn>\n<eos><pad>"
    expected = [2, *enc("Hi"), 4, *enc("user\nok"), 5, *enc("\n"), 1, 0]
    assert enc(text) == expected
    assert enc("<bos>") == [tok.bos_id]
    assert enc("a<bos><bos>b") == [*enc("a"), 2, 2, *enc("b")]
    # Sentencepiece alone spells control symbols out character by character.
    assert spm.SentencePieceProcessor(model_file=str(model_path)).encode("<bos>") != [2]
    assert len(enc("<unk>")) > 1  # only the five Gemma markers are mapped


def test_add_bos_eos_and_decode_skips_control_tokens(tok):
    ids = tok.encode("Hi", add_bos=True, add_eos=True)
    assert ids == [tok.bos_id, *tok.encode("Hi"), tok.eos_id]
    assert tok.decode([*ids, tok.pad_id, tok.pad_id]) == "Hi"
    # Turn markers are ordinary (user-defined) pieces, so they decode to their text.
    assert tok.decode(tok.encode(CHAT_TEXT)) == CHAT_TEXT.removeprefix("<bos>")
    assert tok.decode(np.array(ids, dtype=np.int32)) == "Hi"


def test_encode_batch_right_and_left(tok):
    a, b = tok.encode("hello world"), tok.encode("a")
    assert len(a) > len(b) > 0
    gap = len(a) - len(b)

    ids, mask = tok.encode_batch(["hello world", "a", ""])
    assert ids.dtype == np.int32 and mask.dtype == np.bool_
    np.testing.assert_array_equal(ids, [[2, *a], [2, *b] + [0] * gap, [2] + [0] * len(a)])
    np.testing.assert_array_equal(
        mask, [[True] * (1 + len(a)), [True] * (1 + len(b)) + [False] * gap, [True] + [False] * len(a)]
    )

    ids, mask = tok.encode_batch(["hello world", "a"], add_bos=False, pad_to=len(a) + 3, padding_side="left")
    np.testing.assert_array_equal(ids, [[0] * 3 + a, [0] * (gap + 3) + b])
    np.testing.assert_array_equal(mask, [[False] * 3 + [True] * len(a), [False] * (gap + 3) + [True] * len(b)])

    ids, _ = tok.encode_batch(["hello world"], pad_to=len(a) + 1)  # exactly full
    np.testing.assert_array_equal(ids, [[2, *a]])


def test_encode_batch_errors(tok):
    with pytest.raises(ValueError, match=r"text 1 .*pad_to=2"):
        tok.encode_batch(["a", "hello world"], pad_to=2)
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode_batch(["a"], padding_side="middle")
    ids, mask = tok.encode_batch([])
    assert ids.shape == mask.shape == (0, 0)


def test_chat_template_exact(tok):
    assert tok.apply_chat_template(CHAT) == CHAT_TEXT
    model_roles = [dict(m, role="model" if m["role"] == "assistant" else m["role"]) for m in CHAT]
    assert tok.apply_chat_template(model_roles) == CHAT_TEXT
    padded = [dict(m, content=f"  {m['content']}\n") for m in CHAT]  # content is trimmed
    assert tok.apply_chat_template(padded) == CHAT_TEXT
    assert tok.apply_chat_template(CHAT[:2], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi there<end_of_turn>\n"
    )


def test_chat_template_merges_system_prompt(tok):
    messages = [{"role": "system", "content": "You are terse."}, *CHAT[:1]]
    assert tok.apply_chat_template(messages) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHello<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        ("Hello", "non-empty"),
        ([{"role": "assistant", "content": "Hi"}], r"message 0\b.*expected role user"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"message 1\b"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], r"message 1\b.*'robot'"),
        ([{"role": "user", "content": "a"}, {"role": "model", "content": "b"}, {"role": "user", "content": 3}],
         r"message 2\b.*content"),
        ([{"role": "user", "content": "a"}, "not a dict"], r"message 1\b"),
        ([{"role": "system", "content": "s"}], r"message 1\b"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], r"message 1\b"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], r"message 1\b.*system"),
        ([{"content": "a"}], r"message 0\b.*role"),
    ],
)
def test_chat_template_rejects_invalid_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages)


def test_encode_chat(tok):
    enc = tok.encode
    ids = tok.encode_chat(CHAT)
    sot, eot, nl = tok.start_of_turn_id, tok.end_of_turn_id, enc("\n")
    assert ids == [
        tok.bos_id,
        sot, *enc("user\nHello"), eot, *nl,
        sot, *enc("model\nHi there"), eot, *nl,
        sot, *enc("user\nHow are you?"), eot, *nl,
        sot, *enc("model\n"),
    ]
    assert ids == enc(tok.apply_chat_template(CHAT))
    assert ids.count(tok.bos_id) == 1 and ids.count(sot) == 4 and ids.count(eot) == 3


def test_missing_file(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer.from_file(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        Tokenizer.from_file(tmp_path)  # a directory


@pytest.mark.parametrize("content", [b"", b"this is not a sentencepiece model", b"\x00\xff" * 50])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        Tokenizer.from_file(path)


def test_truncated_file(tmp_path, model_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model_path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*sentencepiece"):
        Tokenizer.from_file(path)


def test_rejects_non_gemma_model(tmp_path):
    # Sentencepiece's defaults: unk 0, bos <s> 1, eos </s> 2, no pad.
    path = tmp_path / "tokenizer.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.read_text().split("\n\n")), model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=300, minloglevel=2,
    )
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a Gemma tokenizer"):
        Tokenizer.from_file(path)


# Gemma 3's chat template, verbatim from google/gemma-3-*-it tokenizer_config.json. For conversations
# without a system message it renders exactly what Gemma 2's template does.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


@pytest.fixture(scope="module")
def hf_tok(model_path, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    # transformers 5 has no slow sentencepiece tokenizer: GemmaTokenizer is a `tokenizers` BPE, and
    # GemmaTokenizer(vocab_file=...) silently ignores the file. from_pretrained on a folder holding only
    # tokenizer.model converts the sentencepiece model instead (and adds a "<mask>" token after the vocab).
    folder = tmp_path_factory.mktemp("hf")
    shutil.copy(model_path, folder / "tokenizer.model")
    return transformers.GemmaTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("text", [*ROUND_TRIP_TEXTS, CHAT_TEXT, " <bos> x<eos><pad>", "<start_of_turn><end_of_turn>"])
def test_ids_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids)


@pytest.mark.parametrize(
    "messages",
    [CHAT, [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "\tHello \n"},
            {"role": "model", "content": "Hi"}]],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_matches_transformers_template(tok, hf_tok, messages, add_generation_prompt):
    text = hf_tok.apply_chat_template(messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == text
    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
