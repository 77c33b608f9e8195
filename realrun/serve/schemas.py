"""Request bodies of /v1/completions and /v1/chat/completions, checked into OpenAI errors.

Supported: ``model``, ``prompt`` (a string, a list of one string, a list of token ids, or
a list of one such list) or ``messages``, ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature`` [0, 2], ``top_p`` [0, 1], ``seed``, ``stop``
(a string or up to 4 non-empty strings), ``n`` = 1, ``stream``, ``stream_options``
(``include_usage``) and ``user`` (ignored). OpenAI parameters this server does not
implement are accepted only at their neutral value (``echo: false``,
``presence_penalty: 0``, ...) and otherwise refused by name; names OpenAI does not know
are refused as OpenAI refuses them. Every problem is an :class:`ApiError` (status 400,
404 for an unknown model) carrying OpenAI's error object; nothing here raises anything
else for any JSON value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


@dataclass
class ApiError(Exception):
    """An HTTP error answered with OpenAI's error object."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


_STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None


class _Common(BaseModel):
    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Any = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionBody(_Common):
    prompt: Any


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _is(value: Any, *neutral: Any) -> bool:
    """``value`` is null or equal to a neutral value of the same type (True is not 1)."""
    return value is None or any(type(value) is type(n) and value == n for n in neutral)


# OpenAI parameters not implemented here: accepted only at a neutral value
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (1,),
    "echo": (False,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "suffix": ("",),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),
    "functions": ([],),
    "function_call": ("none",),
    "service_tier": ("auto", "default"),
    "metadata": ({},),
    "store": (False,),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
}


@dataclass(frozen=True)
class Checked:
    """A request that passed every check that needs no model."""

    body: CompletionBody | ChatBody
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or ApiError."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise bad("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad("the request body must be a JSON object")
    return data


def check(data: dict[str, Any], chat: bool) -> Checked:
    """Validate a completions (``chat`` False) or chat body; ApiError names the parameter."""
    cls = ChatBody if chat else CompletionBody
    known = set(cls.model_fields)
    for name, value in data.items():
        if name in known:
            continue
        if name in _NEUTRAL:
            if not _is(value, *_NEUTRAL[name]):
                raise bad(
                    f"{name} is not supported by this server",
                    param=name,
                    code="unsupported_parameter",
                )
            continue
        raise bad(f"Unrecognized request argument supplied: {name}", param=name)
    body = {k: v for k, v in data.items() if k in known}
    try:
        parsed = cls.model_validate(body)
    except ValidationError as exc:
        raise _from_validation(exc) from None
    except (ValueError, TypeError, RecursionError) as exc:  # a value pydantic cannot read
        raise bad(f"invalid request: {type(exc).__name__}") from None
    if parsed.n is not None and parsed.n != 1:
        raise bad("only n = 1 is supported", param="n", code="unsupported_parameter")
    stream = bool(parsed.stream)
    if parsed.stream_options is not None and not stream:
        raise bad("stream_options is only allowed with stream: true", param="stream_options")
    include = bool(parsed.stream_options and parsed.stream_options.include_usage)
    if not chat:
        _check_prompt(parsed.prompt)  # type: ignore[union-attr]
    return Checked(parsed, _stops(parsed.stop), stream, include)


def _from_validation(exc: ValidationError) -> ApiError:
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ())]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return bad(f"missing required parameter: {param}", param=param)
    return bad(f"{param}: {msg}" if param else msg, param=param)


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop must be a string or a list of strings", param="stop")
    if len(items) > 4:
        raise bad("stop takes at most 4 strings", param="stop")
    if any(s == "" for s in items):
        raise bad("stop strings must not be empty", param="stop")
    return tuple(items)


def _ints(xs: Any) -> bool:
    return isinstance(xs, list) and bool(xs) and all(type(x) is int for x in xs)


def _check_prompt(prompt: Any) -> None:
    """One prompt: a string, [string], token ids, or [token ids]."""
    if isinstance(prompt, str) or _ints(prompt):
        return
    if isinstance(prompt, list) and len(prompt) == 1:
        if isinstance(prompt[0], str) or _ints(prompt[0]):
            return
    if (
        isinstance(prompt, list)
        and len(prompt) > 1
        and all(isinstance(p, str | list) for p in prompt)
    ):
        raise bad("only one prompt per request is supported (n = 1, one prompt)", param="prompt")
    raise bad(
        "prompt must be a string, a list of one string, a non-empty list of token ids, "
        "or a list of one such list",
        param="prompt",
    )


def prompt_of(body: CompletionBody) -> str | list[int]:
    """The single prompt of a checked completions body: text or token ids."""
    p = body.prompt
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]
    return p


def messages_of(body: ChatBody) -> list[dict[str, str]]:
    """The chat messages as {role, content} with text parts joined."""
    out = []
    for m in body.messages:
        c = m.content
        text = "" if c is None else c if isinstance(c, str) else "".join(p.text for p in c)
        out.append({"role": m.role, "content": text})
    return out
