"""`generate` / `infer` / `perplexity` on the command line: bad arguments and texts fail in one line, before the weights load."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from gemma_jax import cli

REQUIRED = {
    "generate": ["--prompt", "x"],
    "infer": ["--input", "in.jsonl", "--output", "out.jsonl"],
    "perplexity": ["--text-file", "t.txt"],
}


@pytest.fixture
def no_weights(monkeypatch):
    """Loading the weights fails the test: what is checked here must be checked before."""

    def load(args):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(cli, "_load_model", load)


@pytest.mark.parametrize(
    "command, arg, value, message",
    [
        ("generate", "--seed", str(2**70), "must be in [0, 4294967295]"),
        ("generate", "--seed", "-1", "must be in [0, 4294967295]"),
        ("generate", "--max-new-tokens", "-5", "must be >= 1"),
        ("generate", "--max-new-tokens", "ten", "expected an integer"),
        ("generate", "--temperature", "-0.5", "must be >= 0"),
        ("generate", "--temperature", "nan", "must be >= 0"),
        ("generate", "--top-p", "0", "must be in (0, 1]"),
        ("generate", "--top-p", "1.5", "must be in (0, 1]"),
        ("generate", "--top-k", "0", "must be >= 1"),
        ("infer", "--batch-size", "0", "must be >= 1"),
        ("infer", "--batch-size", "-1", "must be >= 1"),
        ("infer", "--max-new-tokens", "0", "must be >= 1"),
        ("infer", "--max-new-tokens", "-5", "must be >= 1"),
        ("infer", "--seed", str(2**70), "must be in [0, 4294967295]"),
        ("infer", "--temperature", "-1", "must be >= 0"),
        ("infer", "--top-p", "2", "must be in (0, 1]"),
        ("perplexity", "--batch", "0", "must be >= 1"),
        ("perplexity", "--ctx", "1", "must be >= 4"),
        ("perplexity", "--stride", "0", "must be >= 1"),
    ],
)
def test_bad_numbers_are_named_at_parse_time(capsys, no_weights, command, arg, value, message):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, *REQUIRED[command], arg, value])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"gemma-jax {command}: error: argument {arg}: {message}, got {value}"


def test_perplexity_checks_the_text_before_loading_the_weights(text_checkpoint, tmp_path, monkeypatch, no_weights):
    monkeypatch.chdir(tmp_path)
    ckpt = str(text_checkpoint[1])
    Path("short.txt").write_text("GNU General Public License")
    Path("latin1.txt").write_bytes(b"caf\xe9")
    cases = [
        (["--text-file", "short.txt", "--ctx", "64"], r"the text has \d+ tokens; --ctx 64 needs at least 128"),
        (["--text-file", "short.txt", "--ctx", "8", "--stride", "8"], r"--stride must be in \[1, ctx-1\], got 8"),
        (["--text-file", "latin1.txt"], "latin1.txt: cannot read the text: 'utf-8' codec can't decode byte 0xe9"),
        (["--text-file", "."], r"\.: cannot read the text: Is a directory"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit:
            cli.main(["perplexity", "--ckpt", ckpt, *args])
        assert re.fullmatch(f"gemma-jax perplexity: error: {message}.*", exit.value.code), exit.value.code


def test_generate_prompt_that_is_not_utf8_is_one_line(text_checkpoint):
    cmd = [b"gemma-jax", b"generate", b"--ckpt", bytes(text_checkpoint[1]), b"--prompt", b"caf\xe9", b"--max-new-tokens", b"2"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "gemma-jax generate: error: text is not valid UTF-8: character 3 is a lone surrogate, U+DCE9"
    )
    assert "Traceback" not in done.stderr
