"""The ASGI app of `pipo serve`: OpenAI routes over an `EngineRunner`.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (streamed as server-sent events
ending in `data: [DONE]` when `stream` is true), `GET /v1/models`, `GET /health`. A client
that goes away mid-request has its sequence aborted, so its memory returns to the pool.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pipo.serve.protocol import RequestError, Usage, choice, envelope, finish_reason, parse_request
from pipo.serve.runner import EngineRunner, Event

DISCONNECT_POLL_S = 0.25


def create_app(runner: EngineRunner, model_name: str) -> FastAPI:
    """The app; the runner's thread starts with the app and its requests are cancelled when it stops."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="pipo serve", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "running": len(runner.live)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "pipo"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, chat=False)

    async def _generate(request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"the request body is not valid JSON: {err}") from None
        parsed = parse_request(body, chat=chat, model_name=model_name)
        request_id, events = runner.submit(parsed)
        first: Event = await events.get()
        if first.kind == "error":
            raise first.error
        name = ("chatcmpl-" if chat else "cmpl-") + request_id
        if parsed.stream:
            return StreamingResponse(_stream(runner, request, request_id, name, model_name, parsed, first, events),
                                     media_type="text/event-stream")
        return await _collect(runner, request, request_id, name, model_name, parsed, first, events)

    return app


async def _next_event(events: asyncio.Queue, request: Request | None) -> Event | None:
    """The next event; None if the client disconnected first (checked every `DISCONNECT_POLL_S`)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if request is not None and await request.is_disconnected():
                return None


async def _collect(runner, request, request_id, name, model, parsed, first: Event, events) -> JSONResponse:
    """A whole (non-streamed) response; a client gone before the end aborts the request."""
    texts = [[first.content, ""] for _ in range(parsed.n)]  # [content, reasoning] per sample
    reasons: list[str | None] = [None] * parsed.n
    usage, split = Usage(prompt_tokens=first.prompt_tokens * parsed.n), [False] * parsed.n
    while any(r is None for r in reasons):
        event = await _next_event(events, request)
        if event is None:
            runner.abort(request_id)
            return JSONResponse({}, status_code=499)
        if event.kind == "error":
            raise event.error
        texts[event.sample][0] += event.content
        texts[event.sample][1] += event.reasoning
        split[event.sample] = split[event.sample] or bool(event.reasoning)
        if event.kind == "finished":
            reasons[event.sample] = finish_reason(event.finish_reason)
            usage.add(event.stats)
    choices = [choice(i, content, reasoning if split[i] else None, reasons[i], parsed.chat, delta=False)
               for i, (content, reasoning) in enumerate(texts)]
    return JSONResponse(envelope(name, model, parsed.chat, choices, usage.body(), chunk=False))


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _stream(runner, request, request_id, name, model, parsed, first: Event, events) -> AsyncIterator[str]:
    """Server-sent chunks: a role chunk per choice (chat), deltas, a finish chunk per choice, usage, [DONE].
    If the client goes away (the generator is cancelled, or a poll finds it gone), `finally` aborts the sequence."""
    finished = 0
    usage = Usage(prompt_tokens=first.prompt_tokens * parsed.n)
    try:
        for i in range(parsed.n):
            if parsed.chat:
                yield _sse(envelope(name, model, True, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}], None, chunk=True))
            elif first.content:
                yield _sse(envelope(name, model, False, [choice(i, first.content, None, None, False, True)], None,
                                    chunk=True))
        while finished < parsed.n:
            event = await _next_event(events, request)
            if event is None:
                return
            if event.kind == "error":
                yield _sse(event.error.body())
                return
            reason = finish_reason(event.finish_reason) if event.kind == "finished" else None
            if event.content or event.reasoning or reason:
                reasoning = event.reasoning if event.reasoning else None
                yield _sse(envelope(name, model, parsed.chat,
                                    [choice(event.sample, event.content, reasoning, reason, parsed.chat, True)],
                                    None, chunk=True))
            if event.kind == "finished":
                finished += 1
                usage.add(event.stats)
        if parsed.include_usage:
            yield _sse(envelope(name, model, parsed.chat, [], usage.body(), chunk=True))
        yield _sse("[DONE]")
    finally:
        if finished < parsed.n:
            runner.abort(request_id)
