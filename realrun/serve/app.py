"""The FastAPI application: OpenAI's completions and chat endpoints over a ServingEngine.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true``: server-sent events, one ``data:`` line per piece of text, the last
chunk with ``finish_reason`` and ``usage``, then ``data: [DONE]``; with
``stream_options.include_usage`` also OpenAI's extra usage chunk with no choices),
``GET /health`` and ``GET /metrics`` (Prometheus text format).

Errors are OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``:
400 for a bad body, 404 for an unknown model or path, 405 for a wrong method, 429 with
``Retry-After`` when the queue is full, 503 while shutting down. An unexpected exception
is a 500 with the same object and no traceback (the traceback goes to stderr).

A request whose client disconnects is cancelled: a streamed one when Starlette notices
(it listens for the disconnect while streaming), a plain one by a task that waits for the
disconnect beside the answer. Either way the engine frees its slot after the forward that
runs at that moment.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse as _StarletteJSON
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from realrun.serve.engine import (
    Delta,
    Event,
    Failed,
    Finished,
    Job,
    QueueFull,
    ServingEngine,
    ShuttingDown,
)
from realrun.serve.metrics import ServeMetrics
from realrun.serve.sampling import SamplingParams
from realrun.serve.schemas import (
    ApiError,
    ChatBody,
    Checked,
    CompletionBody,
    bad,
    check,
    messages_of,
    parse_json,
    prompt_of,
)

RETRY_AFTER_S = 1  # a slot frees when a running request finishes; ask again soon


class JSONResponse(_StarletteJSON):
    """JSON with non-ASCII characters escaped: an error message may quote a client's
    string, and a lone surrogate in it is valid escaped JSON but cannot be UTF-8 encoded."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False).encode("ascii")


@dataclass
class Served:
    """What the app serves: the engine, its metrics and the model's text interface."""

    engine: ServingEngine
    metrics: ServeMetrics
    model_id: str
    aliases: tuple[str, ...]  # other names accepted for the model (the --model value)
    encode: Callable[[str], list[int]]
    chat_ids: Callable[[list[dict[str, str]]], list[int] | None]
    vocab_size: int
    max_positions: int | None  # the model's context (None: no limit known)
    created: int = 0


def plain_chat(messages: list[dict[str, str]]) -> str:
    """The chat prompt of a tokenizer without a chat template: one ``role: content`` line
    per message, then ``assistant:`` (the tiny presets' byte tokenizer has no template)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class _CountResponses:
    """ASGI middleware: counts each HTTP response by endpoint and status."""

    def __init__(self, app: Any, metrics: ServeMetrics, endpoints: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(endpoint, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counted)


def create_app(served: Served) -> FastAPI:
    """The application serving ``served`` (the engine must be started by the caller)."""
    app = FastAPI(title="fmoe serve", docs_url=None, redoc_url=None, openapi_url=None)
    served.created = served.created or int(time.time())
    api = _Api(served)

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = ApiError(exc.status_code, str(exc.detail), param=None, code=kind)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc, file=sys.stderr)
        err = ApiError(500, "internal server error", type="internal_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not served.engine.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(served.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {
            "id": served.model_id,
            "object": "model",
            "created": served.created,
            "owned_by": "fmoe",
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await api.handle(request, chat=True)

    endpoints = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}
    app.add_middleware(_CountResponses, metrics=served.metrics, endpoints=endpoints)
    return app


class _Api:
    """The two generation endpoints: check, queue, answer (whole or streamed)."""

    def __init__(self, served: Served) -> None:
        self.s = served

    async def handle(self, request: Request, chat: bool) -> Response:
        checked = check(parse_json(await request.body()), chat)
        body = checked.body
        if body.model != self.s.model_id and body.model not in self.s.aliases:
            raise ApiError(
                404,
                f"The model `{body.model}` does not exist (this server serves `{self.s.model_id}`)",
                param="model",
                code="model_not_found",
            )
        ids, text = self._prompt(body)
        params = self._params(checked, len(ids))
        kind = "chatcmpl" if chat else "cmpl"
        rid = f"{kind}-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(ev: Event) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the event loop is gone: nobody waits for this answer
                pass

        job = Job(rid, ids, params, deliver, text)
        try:
            self.s.engine.submit(job)
        except QueueFull:
            self.s.metrics.rejected("queue_full")
            raise ApiError(
                429,
                "the server's queue is full; retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except ShuttingDown:
            self.s.metrics.rejected("shutting_down")
            raise ApiError(
                503, "the server is shutting down", type="unavailable", code="shutting_down"
            ) from None
        fmt = _Format(rid, self.s.model_id, chat, int(time.time()))
        if checked.stream:
            return StreamingResponse(
                self._stream(job, queue, fmt, checked.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await self._whole(request, job, queue, fmt)

    # -- the prompt and the decoding settings -------------------------------------------------
    def _prompt(self, body: CompletionBody | ChatBody) -> tuple[list[int], str | None]:
        """Token ids of the prompt (and its text); ApiError for ids outside the vocabulary
        or text that cannot be encoded."""
        if isinstance(body, ChatBody):
            msgs = messages_of(body)
            param = "messages"
            try:
                ids = self.s.chat_ids(msgs)
                if ids is not None:
                    return ids, None
                text = plain_chat(msgs)
                return self.s.encode(text), text
            except Exception as exc:  # a template or tokenizer refusing this input
                raise bad(f"messages cannot be encoded: {_short(exc)}", param=param) from None
        prompt = prompt_of(body)
        if isinstance(prompt, list):
            V = self.s.vocab_size
            if any(not 0 <= t < V for t in prompt):
                raise bad(f"prompt token ids must be in [0, {V})", param="prompt")
            return list(prompt), None
        try:
            return self.s.encode(prompt), prompt
        except Exception as exc:  # lone surrogates and the like
            raise bad(f"prompt cannot be encoded: {_short(exc)}", param="prompt") from None

    def _params(self, checked: Checked, prompt_len: int) -> SamplingParams:
        body = checked.body
        limit = self.s.max_positions
        want = body.max_tokens
        if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
            want = body.max_completion_tokens
        param = "prompt" if isinstance(body, CompletionBody) else "messages"
        if limit is not None and prompt_len >= limit:
            raise bad(
                f"This model's maximum context length is {limit} tokens; the prompt has "
                f"{prompt_len} tokens, which leaves no room for an answer",
                param=param,
                code="context_length_exceeded",
            )
        if want is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
            want = 16 if isinstance(body, CompletionBody) else None
            if want is None:
                want = (limit - prompt_len) if limit is not None else 16
        if limit is not None and prompt_len + want > limit:
            raise bad(
                f"This model's maximum context length is {limit} tokens; you requested "
                f"{prompt_len + want} tokens ({prompt_len} in the prompt, {want} for the answer)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return SamplingParams(
            max_tokens=want,
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            seed=body.seed,
            stop=checked.stop,
        )

    # -- answers ------------------------------------------------------------------------------
    async def _whole(
        self, request: Request, job: Job, queue: asyncio.Queue[Event], fmt: _Format
    ) -> Response:
        answer = asyncio.ensure_future(_collect(queue))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():  # the client went away: free the slot
                self.s.engine.cancel(job)
                return Response(status_code=499)
            text, end = answer.result()
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()
            if not job.done:
                self.s.engine.cancel(job)
        if isinstance(end, Failed):
            raise ApiError(500, end.message, type="internal_error", code="internal_error")
        if end.reason == "cancelled":
            raise ApiError(
                503,
                "the request was cancelled: the server is shutting down",
                type="unavailable",
                code="cancelled",
            )
        return JSONResponse(fmt.whole(text, end))

    async def _stream(
        self, job: Job, queue: asyncio.Queue[Event], fmt: _Format, include_usage: bool
    ) -> AsyncIterator[str]:
        try:
            if fmt.chat:
                yield _sse(fmt.chunk({"role": "assistant", "content": ""}, None))
            while True:
                ev = await queue.get()
                if isinstance(ev, Delta):
                    yield _sse(fmt.chunk(fmt.piece(ev.text), None))
                    continue
                if isinstance(ev, Failed) or ev.reason == "cancelled":
                    msg = ev.message if isinstance(ev, Failed) else "the request was cancelled"
                    err = ApiError(
                        500 if isinstance(ev, Failed) else 503, msg, type="internal_error"
                    )
                    yield _sse(err.body())
                else:
                    usage = _usage(ev)
                    yield _sse(fmt.chunk(fmt.piece(ev.text), ev.reason, usage))
                    if include_usage:
                        yield _sse({**fmt.head("chunk"), "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"
                return
        finally:
            if not job.done:
                self.s.engine.cancel(job)


@dataclass(frozen=True)
class _Format:
    """OpenAI's response and chunk objects of one request."""

    rid: str
    model: str
    chat: bool
    created: int

    def head(self, kind: str) -> dict[str, Any]:
        obj = {
            ("chat", "whole"): "chat.completion",
            ("chat", "chunk"): "chat.completion.chunk",
            ("text", "whole"): "text_completion",
            ("text", "chunk"): "text_completion",
        }[("chat" if self.chat else "text", kind)]
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, end: Finished) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": end.reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": end.reason}
        return {**self.head("whole"), "choices": [choice], "usage": _usage(end)}

    def piece(self, text: str) -> dict[str, Any] | str:
        return {"content": text} if self.chat else text

    def chunk(
        self, piece: dict[str, Any] | str, reason: str | None, usage: dict | None = None
    ) -> dict[str, Any]:
        if self.chat:
            delta = piece if reason is None or piece.get("content") else {}  # type: ignore[union-attr]
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}
        out = {**self.head("chunk"), "choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        return out


def _usage(end: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.completion_tokens,
        "total_tokens": end.prompt_tokens + end.completion_tokens,
    }


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=True)}\n\n"


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


async def _collect(queue: asyncio.Queue[Event]) -> tuple[str, Finished | Failed]:
    """Every piece of a request's answer until it ends."""
    parts = []
    while True:
        ev = await queue.get()
        if isinstance(ev, Delta):
            parts.append(ev.text)
        else:
            if isinstance(ev, Finished):
                parts.append(ev.text)
            return "".join(parts), ev


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
