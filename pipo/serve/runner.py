"""The engine on a thread of its own, fed by HTTP handlers on the event loop.

The engine is not thread-safe and its steps block, so one thread owns it (and the tokenizer)
and loops: take new requests and aborts from an inbox, run one engine step, turn the step's
updates into text deltas, and hand them to each request's asyncio queue. A request that
arrives while others decode joins the running batch at the next step; an abort frees the
sequence's memory at once.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from dataclasses import dataclass, field

from pipo.engine import prompt_positions
from pipo.errors import PIPOError
from pipo.serve.protocol import GenerationRequest, RequestError
from pipo.serve.stream import TextStream, prompt_opens_thinking


@dataclass
class Event:
    """What a request's queue receives: `accepted` once, deltas per sample, `finished` per sample, or `error`."""

    kind: str  # "accepted" | "delta" | "finished" | "error"
    sample: int = 0
    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None
    stats: object = None
    prompt_tokens: int = 0
    error: RequestError | None = None


@dataclass
class _Live:
    """A request being served: where its events go, and one text stream per sample."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    streams: list[TextStream] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)  # visible tokens so far, per sample
    remaining: int = 0


class EngineRunner:
    """Owns an `Engine` on one thread; `submit` and `abort` may be called from any thread."""

    def __init__(self, engine, *, split_reasoning: bool = False) -> None:
        self.engine = engine
        self.split_reasoning = split_reasoning
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.live: dict[str, _Live] = {}
        self.thread = threading.Thread(target=self._loop, name="pipo-engine", daemon=True)
        self.stopped = False

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Cancel what is still running and end the thread."""
        self.inbox.put(("stop", None, None))
        self.thread.join(timeout=60)

    def submit(self, request: GenerationRequest) -> tuple[str, asyncio.Queue]:
        """Queue a request; its first event says whether the engine took it."""
        request_id = uuid.uuid4().hex
        events: asyncio.Queue = asyncio.Queue()
        self.inbox.put(("add", request_id, (request, _Live(asyncio.get_running_loop(), events))))
        return request_id, events

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id, None))

    # ---------------------------------------------------------------- the engine thread
    def _send(self, live: _Live, event: Event) -> None:
        live.loop.call_soon_threadsafe(live.events.put_nowait, event)

    def _loop(self) -> None:
        while True:
            busy = self.engine.has_unfinished()
            try:
                command = self.inbox.get(block=not busy, timeout=None)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    self._cancel_all(RequestError(503, "the server is shutting down"))
                    return
                self._handle(*command)
                try:
                    command = self.inbox.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_unfinished():
                try:
                    updates = self.engine.step()
                except Exception as err:  # an engine failure ends the requests in flight, not the server
                    self._cancel_all(RequestError(500, f"the engine failed: {type(err).__name__}: {err}"))
                    continue
                for update in updates:
                    self._update(update)

    def _handle(self, kind: str, request_id: str, payload) -> None:
        if kind == "abort":
            if self.live.pop(request_id, None) is not None:
                self.engine.abort(request_id)
            return
        request, live = payload
        try:
            prompt_ids = self._encode(request)
            self.engine.add_request(
                request_id, prompt_ids, request.sampling, self._max_tokens(request, prompt_ids), n=request.n,
                stop=request.stop, stop_token_ids=request.stop_token_ids, seed=request.seed,
            )
        except RequestError as err:
            self._send(live, Event("error", error=err))
            return
        except PIPOError as err:
            self._send(live, Event("error", error=RequestError(400, str(err), "messages" if request.chat else "prompt",
                                                               "context_length_exceeded")))
            return
        thinking = self.split_reasoning and request.chat and prompt_opens_thinking(
            self.engine.tokenizer.decode(prompt_ids[-8:]))
        live.streams = [TextStream(self.engine.tokenizer, request.stop, self.split_reasoning and request.chat,
                                   thinking) for _ in range(request.n)]
        live.tokens = [[] for _ in range(request.n)]
        live.remaining = request.n
        self.live[request_id] = live
        echo = self.engine.tokenizer.decode(prompt_ids) if request.echo else ""
        self._send(live, Event("accepted", content=echo, prompt_tokens=len(prompt_ids)))

    def _encode(self, request: GenerationRequest) -> list[int]:
        if request.chat:
            return self.engine.encode(request.prompt)
        if isinstance(request.prompt, str):
            return list(self.engine.tokenizer(request.prompt, add_special_tokens=False)["input_ids"])
        return list(request.prompt)

    def _max_tokens(self, request: GenerationRequest, prompt_ids: list[int]) -> int:
        room = self.engine.max_seq_len - prompt_positions(len(prompt_ids), self.engine.method)
        if request.max_tokens is None:
            return max(room, 1)
        if request.max_tokens > room:
            raise RequestError(400, f"max_tokens={request.max_tokens} plus the prompt's {len(prompt_ids)} tokens "
                                    f"exceed this server's context of {self.engine.max_seq_len} tokens",
                               "max_tokens", "context_length_exceeded")
        return request.max_tokens

    def _update(self, update) -> None:
        live = self.live.get(update.request_id)
        if live is None:  # aborted while its step ran
            return
        stream = live.streams[update.sample]
        if update.finished:
            reasoning, content = stream.finish(update.completion.text)
            self._send(live, Event("finished", update.sample, reasoning, content,
                                   update.completion.finish_reason, update.completion.stats))
            live.remaining -= 1
            if not live.remaining:
                del self.live[update.request_id]
            return
        live.tokens[update.sample] += update.token_ids
        reasoning, content = stream.push(live.tokens[update.sample])
        if reasoning or content:
            self._send(live, Event("delta", update.sample, reasoning, content))

    def _cancel_all(self, error: RequestError) -> None:
        for request_id, live in list(self.live.items()):
            self.engine.abort(request_id)
            self._send(live, Event("error", error=error))
        self.live.clear()
