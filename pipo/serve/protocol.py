"""The OpenAI HTTP protocol as `pipo serve` speaks it: request bodies in, response and chunk bodies out.

Request bodies are checked here, field by field, so a bad request becomes one OpenAI-style
error (`{"error": {"message", "type", "param", "code"}}`) naming the field: malformed JSON
is 400, a field of the wrong type or a missing one is 422, a value out of range is 400, an
unknown model is 404. Nothing here touches the engine or the network.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from pipo.chat import ROLES, check_messages
from pipo.errors import InputError
from pipo.model.sampling import SamplingParams


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, and the offending field (`param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 404: "not_found_error", 422: "invalid_request_error"}
        return {"error": {"message": self.message, "type": kind.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """One validated `/v1/chat/completions` or `/v1/completions` request."""

    chat: bool  # chat: `prompt` holds messages; else a text or token ids
    prompt: list[dict] | str | list[int]
    sampling: SamplingParams
    max_tokens: int | None  # None: up to the sequence limit
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: usage in the last chunk
    echo: bool = False  # completions: the prompt text before the completion
    extra: dict = field(default_factory=dict)


def _number(body: dict, name: str, default, *, low=None, high=None, integer=False, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(422, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not math.isfinite(value):
        raise RequestError(400, f"'{name}' must be finite, got {value!r}", name)
    if low is not None and (value <= low if low_open else value < low):
        raise RequestError(400, f"'{name}' must be {'>' if low_open else '>='} {low}, got {value}", name)
    if high is not None and value > high:
        raise RequestError(400, f"'{name}' must be <= {high}, got {value}", name)
    return value


def _messages(body: dict) -> list[dict]:
    """The chat of a request (`developer` is OpenAI's newer name for `system`); text content parts are joined."""
    try:
        messages = check_messages(body.get("messages"), roles=(*ROLES, "developer"), text_parts=True)
    except InputError as e:
        raise RequestError(422, str(e), e.field) from None
    return [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise RequestError(422, "'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
                       "prompt")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise RequestError(422, "'stop' must be a string or a list of at most 4 strings", "stop")
    return tuple(s for s in stops if s)


def parse_request(body: object, *, chat: bool, model_name: str) -> GenerationRequest:
    """A validated request from a decoded JSON body; `RequestError` names the first bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(422, "'model' must be a string", "model")
    if model != model_name:
        raise RequestError(404, f"The model '{model}' does not exist; this server serves '{model_name}'", "model",
                           "model_not_found")
    prompt = _messages(body) if chat else _prompt(body)
    limit_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, limit_key, None, low=1, integer=True)
    temperature = _number(body, "temperature", 1.0, low=0, high=2)
    top_p = _number(body, "top_p", 1.0, low=0, high=1, low_open=True)
    top_k = _number(body, "top_k", 0, low=-1, integer=True)
    min_p = _number(body, "min_p", 0.0, low=0, high=0.999999)
    presence = _number(body, "presence_penalty", 0.0, low=-2, high=2)
    n = _number(body, "n", 1, low=1, high=128, integer=True)
    seed = _number(body, "seed", None, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(422, "'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(422, "'stream_options' must be an object", "stream_options")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise RequestError(422, "'stop_token_ids' must be a list of token ids", "stop_token_ids")
    sampling = SamplingParams(temperature, top_p, max(top_k, 0), min_p, presence)
    return GenerationRequest(
        chat=chat, prompt=prompt, sampling=sampling, max_tokens=max_tokens, n=n, stop=_stop(body),
        stop_token_ids=tuple(stop_ids), seed=seed, stream=stream,
        include_usage=bool(options.get("include_usage", False)), echo=bool(body.get("echo", False)) and not chat,
    )


@dataclass
class Usage:
    """Token counts of a request, with PIPO's own figures in an extra `pipo` field."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0

    def add(self, stats) -> None:
        self.completion_tokens += stats.emitted_tokens
        self.forward_passes += stats.forward_passes
        self.drafted += stats.drafted
        self.accepted += stats.accepted

    def body(self) -> dict:
        per_forward = self.completion_tokens / self.forward_passes if self.forward_passes else 0.0
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "pipo": {"forward_passes": self.forward_passes, "tokens_per_forward": round(per_forward, 4),
                     "drafted": self.drafted, "accepted": self.accepted,
                     "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else 0.0},
        }


def finish_reason(engine_reason: str) -> str:
    """OpenAI's names: EOS and stop strings are both `stop`; running out of budget is `length`."""
    return "length" if engine_reason == "length" else "stop"


def envelope(request_id: str, model: str, chat: bool, choices: list[dict], usage: dict | None, chunk: bool) -> dict:
    """The outer object of a response or a stream chunk."""
    obj = "chat.completion.chunk" if chat and chunk else "chat.completion" if chat else "text_completion"
    out = {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None or not chunk:
        out["usage"] = usage
    return out


def choice(index: int, text: str, reasoning: str | None, reason: str | None, chat: bool, delta: bool) -> dict:
    """One entry of `choices`: a chat message / delta (with `reasoning_content` when split) or a text."""
    if not chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    message: dict = {} if delta else {"role": "assistant"}
    if not delta or text:
        message["content"] = text
    if reasoning is not None and (reasoning or not delta):
        message["reasoning_content"] = reasoning
    return {"index": index, "delta" if delta else "message": message, "logprobs": None, "finish_reason": reason}
