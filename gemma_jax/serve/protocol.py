"""The OpenAI wire format: request bodies (validated), responses, stream chunks and error bodies.

Request fields this server does not know are ignored, as OpenAI clients send many; known
fields are type-checked strictly (a string where a number belongs is an error, not coerced),
and features it does not implement (logprobs, penalties, tools, ...) are refused by name
rather than silently ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Prompt = str | list[str] | list[int] | list[list[int]]
# Fields refused when set to anything but their neutral value.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "presence_penalty", "frequency_penalty", "logit_bias",
               "tools", "functions", "tool_choice", "response_format")  # fmt: skip


class BadRequest(ValueError):
    """A request the server refuses (400), with the offending parameter when known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # extras kept only to refuse UNSUPPORTED ones

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: all tokens
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name in UNSUPPORTED:
            value = (self.model_extra or {}).get(name)
            if value not in (None, False, 0, {}, [], {"type": "text"}, "none"):
                raise ValueError(f"'{name}' is not supported by this server")
        return self

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > 16 or not all(stops):
            raise BadRequest("'stop' takes at most 16 non-empty strings", "stop")
        return stops

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: Prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def parse(model: type[_Sampling], body: bytes) -> _Sampling:
    """Validate a JSON body; the first problem becomes a one-line BadRequest naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise BadRequest(f"the body is not valid JSON ({first['ctx'].get('error', first['msg'])})") from None
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"{where}: {first['msg']}" if where else first["msg"], where or None) from None


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def choice(chat: bool, index: int, text: str, finish_reason: str | None, *, delta: bool, first: bool = False) -> dict[str, Any]:
    """One entry of `choices`: whole (`delta=False`) or a stream chunk's."""
    if not chat:
        return dict(index=index, text=text, logprobs=None, finish_reason=finish_reason)
    if not delta:
        return dict(index=index, message=dict(role="assistant", content=text), logprobs=None, finish_reason=finish_reason)
    content = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
    return dict(index=index, delta=content, logprobs=None, finish_reason=finish_reason)


def envelope(chat: bool, rid: str, created: int, model: str, *, chunk: bool, **fields: Any) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return dict(id=rid, object=kind, created=created, model=model, **fields)


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event, as OpenAI streams them (`data: ...` and a blank line)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"
