"""The `gemma-jax` command line: --version, --help defaults, prompts from files and stdin, `chat`."""

from __future__ import annotations

import argparse
import io
import subprocess

import pytest

from gemma_jax.api import Completion
from gemma_jax.chat import base_model_hint, run_chat
from gemma_jax.cli import build_parser
from gemma_jax.tokenizer import Tokenizer

PROMPT = "This License"


def _cli(*args, **kwargs):
    return subprocess.run(["gemma-jax", *args], capture_output=True, text=True, timeout=300, **kwargs)


def test_version():
    done = _cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("gemma-jax 0.1.0 (jax "), done.stdout + done.stderr


def _subcommands(parser):
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices.items()


def test_help_shows_every_default():
    for name, sub in _subcommands(build_parser()):
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in (action.help or ""):
                continue
            assert f"default: {action.default}" in text, f"gemma-jax {name} --help hides {action.option_strings}'s default"


def test_prompt_from_a_file_or_stdin(text_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompt.txt").write_text(PROMPT + "\n", encoding="utf-8")
    args = ["generate", "--ckpt", str(text_checkpoint[1]), "--max-new-tokens", "4"]
    from_file = _cli(*args, "--prompt-file", "prompt.txt")
    from_stdin = _cli(*args, "--prompt", "-", input=PROMPT + "\n")
    assert from_file.returncode == 0 and from_stdin.returncode == 0, from_file.stderr + from_stdin.stderr
    tokens = len(Tokenizer.from_file(text_checkpoint[1] / "tokenizer.model").encode(PROMPT, add_bos=True))
    for done in (from_file, from_stdin):  # the whole prompt, without the trailing newline
        assert done.stderr.splitlines()[-1].startswith(f"[{tokens} prompt tokens, 4 new tokens"), done.stderr
    assert from_file.stdout == from_stdin.stdout


def test_missing_prompt_file_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = _cli("generate", "--ckpt", "tiny", "--prompt-file", "nope.txt")
    assert done.returncode == 1 and done.stderr == "gemma-jax generate: error: --prompt-file nope.txt: no such file\n"


@pytest.mark.parametrize("ckpt, base", [
    ("gemma3-270m", True), ("tiny", True), ("google/gemma-2-2b", True), ("~/models/gemma-3-270m-q4_k_m.gguf", True),
    ("~/models/gemma-2-2b-it", False), ("google/gemma-3-270m-it", False), ("gemma-3-1b-it-qat-q4_0.gguf", False),
    ("Gemma 3 270m It", False), ("org/Llama-3-8B-Instruct", False),
])  # fmt: skip
def test_base_model_hint(ckpt, base):
    assert (base_model_hint(ckpt) is not None) == base


class _Echo:
    """Stands in for a Gemma: records the conversations it is asked to continue."""

    def __init__(self):
        self.seen = []

    def complete(self, prompts, *, chat, stream, max_new_tokens, **_):
        [messages] = prompts
        assert chat
        self.seen.append([dict(m) for m in messages])
        if messages[-1]["content"] == "too long":
            raise ValueError("prompt of 9999 tokens does not fit the context of 2048 tokens")
        text = f"reply {len(self.seen)}"
        stream(0, text)
        return [Completion(text, [1, 2], "stop", 5)]


def test_chat_keeps_history_resets_and_survives_errors():
    model, out, err = _Echo(), io.StringIO(), io.StringIO()
    lines = "Hello\n\n/nope\n/help\ntoo long\nAnd then?\n/reset\nAgain\n/exit\nnot read\n"
    run_chat(model, system="Be brief.", stdin=io.StringIO(lines), stdout=out, stderr=err, max_new_tokens=8)
    system = {"role": "system", "content": "Be brief."}
    assert model.seen == [
        [system, {"role": "user", "content": "Hello"}],
        [system, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "reply 1"},
         {"role": "user", "content": "too long"}],
        [system, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "reply 1"},
         {"role": "user", "content": "And then?"}],
        [system, {"role": "user", "content": "Again"}],
    ]  # fmt: skip
    assert out.getvalue() == "reply 1\nreply 3\nreply 4\n"
    assert "unknown command /nope" in err.getvalue() and "does not fit the context" in err.getvalue()
    assert "\ncommands: /reset" in err.getvalue()  # /help
    assert "[conversation cleared]" in err.getvalue()


def test_chat_subcommand_over_stdin(text_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = _cli("chat", "--ckpt", str(text_checkpoint[1]), "--max-new-tokens", "3", input="Hello\n/reset\nHi\n")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2  # two replies, one line each; then end of input leaves
    assert "looks like a base (pretrained) model" in done.stderr and "Traceback" not in done.stderr
