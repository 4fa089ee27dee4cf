"""The HTTP layer: OpenAI routes, server-sent events, API key, errors, health and metrics.

Each request's events come from the scheduler thread into an asyncio queue. A streamed
response sends them as SSE chunks (an empty-``choices`` chunk with ``usage`` before
``data: [DONE]`` when ``stream_options.include_usage`` is set); a client that goes away
cancels its request, which frees its row before the next decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from snapkv.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from snapkv.serve.scheduler import Completion, QueueFullError
from snapkv.serve.server import Server


def _usage(comp: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": comp.prompt_tokens,
        "completion_tokens": comp.completion_tokens,
        "total_tokens": comp.prompt_tokens + comp.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": comp.cached_tokens},
        "snapkv": {"kept_prompt_tokens": comp.kept_tokens},
    }


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Call:
    """One request's bridge from the scheduler thread to the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_event(self, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))


def create_app(server: Server) -> FastAPI:
    """The FastAPI application of ``server`` (its scheduler starts and stops with the app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="snapkv serve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        server.metrics.requests.labels(request.url.path, str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return await _api_error(request, validation_error(list(err.errors())))

    def _auth(request: Request) -> None:
        if server.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), server.api_key.encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return server.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _auth(request)
        return {"object": "list", "data": [
            {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "snapkv"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        _auth(request)
        return await _generate(body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _auth(request)
        return await _generate(body, request, chat=False)

    async def _generate(body: ChatCompletionRequest | CompletionRequest, request: Request, chat: bool) -> Response:
        call = _Call()
        req = server.prepare(body, call.on_event)
        try:
            server.scheduler.submit(req)
        except QueueFullError as err:
            raise APIError(429, f"queue full: {err}", code="queue_full", headers={"Retry-After": "1"}) from None
        server.metrics.requests.labels(request.url.path, "200").inc()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(call, req, rid, chat, usage), media_type="text/event-stream")
        return await _plain(call, req, request, rid, chat)

    def _chunk(rid: str, chat: bool, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": server.model_name,
                "choices": [choice]}

    async def _stream(call: _Call, req: Any, rid: str, chat: bool, usage: bool) -> AsyncIterator[str]:
        finished = False
        try:
            if chat:
                yield _sse(_chunk(rid, chat, None, None, first=True))
            while True:
                kind, payload = await call.queue.get()
                if kind == "delta":
                    yield _sse(_chunk(rid, chat, payload, None))
                elif kind == "done":
                    finished = True
                    if payload.finish_reason == "cancelled":
                        yield _sse(APIError(503, "request cancelled: the server is shutting down").body())
                    else:
                        yield _sse(_chunk(rid, chat, None if chat else "", payload.finish_reason))
                        if usage:
                            last = _chunk(rid, chat, None, None)
                            last["choices"], last["usage"] = [], _usage(payload)
                            yield _sse(last)
                    yield "data: [DONE]\n\n"
                    return
                elif kind == "error":
                    finished = True
                    status, message = payload
                    yield _sse(APIError(status, message).body())
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:  # the client went away (or the server stops): free the row
                server.scheduler.cancel(req)

    async def _plain(call: _Call, req: Any, request: Request, rid: str, chat: bool) -> Response:
        finished = False
        checked = time.monotonic()
        try:
            while True:
                # Poll the connection every half second, also while tokens keep arriving (a fast decode
                # would otherwise never let the wait time out, and a gone client would keep its row).
                if time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return Response(status_code=499)
                try:
                    kind, payload = await asyncio.wait_for(call.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if kind == "error":
                    finished = True
                    status, message = payload
                    raise APIError(status, message)
                if kind != "done":
                    continue
                finished = True
                if payload.finish_reason == "cancelled":
                    raise APIError(503, "request cancelled: the server is shutting down")
                if chat:
                    choice = {"index": 0, "message": {"role": "assistant", "content": payload.text},
                              "logprobs": None, "finish_reason": payload.finish_reason}
                    obj = "chat.completion"
                else:
                    choice = {"index": 0, "text": payload.text, "logprobs": None,
                              "finish_reason": payload.finish_reason}
                    obj = "text_completion"
                return JSONResponse({"id": rid, "object": obj, "created": int(time.time()),
                                     "model": server.model_name, "choices": [choice], "usage": _usage(payload)})
        finally:
            if not finished:
                server.scheduler.cancel(req)

    return app
