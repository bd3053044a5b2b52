"""`gemma-jax chat`: an interactive conversation with a loaded model, one turn at a time.

The conversation is a list of {"role", "content"} messages; each reply comes from
`Gemma.complete([messages], chat=True, stream=...)`, so the chat template, stop rules and
sampling are exactly those of `generate --chat`. Lines starting with "/" are commands.
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

COMMANDS = "/reset (forget the conversation), /exit (leave; also /quit, Ctrl-D), /help"
# Google names its instruction-tuned Gemma checkpoints "...-it" ("Gemma 3 270m It" in GGUF metadata).
_INSTRUCTION_TUNED = re.compile(r"(?:^|[-_ ./])(it|instruct|chat)(?:$|[-_ ./])", re.IGNORECASE)


def base_model_hint(ckpt: str) -> str | None:
    """A one-line hint when checkpoint `ckpt` (path, file, repo id or name) is not named as instruction-tuned:
    a base model continues text, so chat turns come back as rambling or echoes of the template."""
    if _INSTRUCTION_TUNED.search(ckpt):
        return None
    return (f"{ckpt} looks like a base (pretrained) model, not an instruction-tuned one (no '-it' in its name): "
            "it continues text rather than answering; use an -it checkpoint to chat")  # fmt: skip


def run_chat(
    model: Any,
    *,
    system: str | None = None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    stderr: TextIO = sys.stderr,
    **options: Any,
) -> None:
    """Read user turns from `stdin`, stream each reply to `stdout` and keep the history.

    `options` go to `Gemma.complete` (max_new_tokens, temperature, ...). Ctrl-C during a reply
    stops it and drops that turn; Ctrl-C or end of input at the prompt leaves. A turn the model
    refuses (e.g. the conversation outgrew the context) is reported on `stderr` and dropped.
    """
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if interactive:
        print(f"commands: {COMMANDS}", file=stderr)
    while True:
        try:
            line = input("> ") if interactive and stdin is sys.stdin else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            line = ""
        if not line:  # end of input
            if interactive:
                print(file=stdout)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(start)
            print("[conversation cleared]", file=stderr)
            continue
        if text.startswith("/"):
            unknown = "" if text == "/help" else f"unknown command {text.split()[0]}; "
            print(f"{unknown}commands: {COMMANDS}", file=stderr)
            continue
        messages.append({"role": "user", "content": text})
        try:
            [done] = model.complete([messages], chat=True, stream=lambda _, piece: _write(stdout, piece), **options)
        except KeyboardInterrupt:
            messages.pop()
            print("\n[interrupted; turn dropped]", file=stderr)
            continue
        except ValueError as e:
            messages.pop()
            print(f"error: {e}; turn dropped (/reset starts over)", file=stderr)
            continue
        _write(stdout, "\n")
        if done.finish_reason == "length":
            print(f"[reply cut at {options.get('max_new_tokens')} new tokens]", file=stderr)
        messages.append({"role": "assistant", "content": done.text})


def _write(stream: TextIO, text: str) -> None:
    stream.write(text)
    stream.flush()
