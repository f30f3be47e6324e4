"""Host-side state of one sequence being generated: emitted tokens, stop conditions, statistics, KV blocks."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from pipo.model.sampling import SamplingParams


@dataclass
class RequestStats:
    """Per-completion statistics (the `stats` entries of `pipo generate`'s output rows)."""

    prompt_tokens: int = 0
    emitted_tokens: int = 0  # PADs excluded
    pad_tokens: int = 0
    forward_passes: int = 0  # backbone passes; prefill counts one
    ttft_s: float = 0.0  # from the start of the request's prefill to its first token
    latency_s: float = 0.0  # from the start of its prefill to its last token
    drafted: int = 0  # drafts scored (pipo: token2 drafts; eagle: drafted tokens; mtp: committed drafts)
    accepted: int = 0

    @property
    def accept_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    """One generated sample: visible token ids and text, why it ended, and its statistics."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" (an EOS or stop id), "stop" (a stop string), "length", "abort"
    stats: RequestStats
    raw_ids: list[int] = field(default_factory=list)  # every emitted slot, PADs included


class StopStrings:
    """Finds stop strings in the decoded tail of a token stream (they may span several tokens)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        # a stop string of c characters spans at most c tokens; a few more cover partial UTF-8 bytes
        self.window = 2 * max((len(s) for s in self.stops), default=0) + 4

    def hit(self, token_ids: list[int]) -> bool:
        if not self.stops:
            return False
        tail = self.tokenizer.decode(token_ids[-self.window :])
        return any(s in tail for s in self.stops)

    def truncate(self, text: str) -> str:
        """Text up to (excluding) the earliest stop string."""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=len(text))
        return text[:cut]


@dataclass(eq=False)
class Sequence:
    """A request sample in flight: the engine and decoders append to it through `emit`. Compared by identity:
    the engine's queues hold each once, and field-by-field equality read whole prompts per comparison."""

    index: int  # which prompt
    sample: int  # which of its n samples
    prompt: list[int]
    units: tuple[int, ...]  # the prompt as the backbone sees it (padded to even length for pipo)
    budget: int  # max visible tokens
    stop_ids: frozenset[int]
    stop_strings: StopStrings
    tokens: list[int] = field(default_factory=list)
    raw: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    length: int = 0  # backbone cache entries
    started: float = 0.0
    request_id: str = ""
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    slot: int = -1  # decode row while admitted, else -1
    row: int = -1  # the row it prefills in (a prefill row, then its decode slot)
    blocks: list[int] = field(default_factory=list)  # its block table (pool block ids)
    feed: tuple[int, ...] = ()  # units to prefill: the prompt, or after a preemption prompt + emitted so far
    prefilled: int = 0  # backbone positions of `feed` in the cache
    order: int = 0  # admission counter: the newest admitted is preempted first
    ahead: bool = False  # a prefill ahead of a free slot: its prompt is cached for the queued samples, never decoded
    reported: int = 0  # tokens already handed out by `Engine.step`
    closed: bool = False  # its last update was handed out

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def start(self) -> None:
        if not self.started:  # a preempted sequence keeps its first start time
            self.started = time.perf_counter()
        self.stats.prompt_tokens = len(self.prompt)

    def resume_feed(self, hold_last: bool) -> tuple[int, ...]:
        """What a preempted sequence prefills again: its prompt units and every slot it emitted (PADs included),
        but the last token when `hold_last` (the decoder continues from it as its next step's input)."""
        return self.units + tuple(self.raw[: len(self.raw) - 1] if hold_last and self.raw else self.raw)

    def prefill_job(self) -> Sequence:
        """A sequence that prefills this one's prompt ahead (`Engine._prefill_ahead`) and leaves it in the prefix cache."""
        return Sequence(self.index, self.sample, self.prompt, self.units, self.budget, self.stop_ids,
                        self.stop_strings, request_id=self.request_id, params=self.params, seed=self.seed,
                        feed=self.units, ahead=True)

    def held_token(self) -> list[int]:
        """The emitted token a resumed sequence's feed leaves out ([] when none)."""
        return self.raw[len(self.feed) - len(self.units):]

    def emit(self, token: int) -> bool:
        """Append a visible token; True once the sequence is finished (EOS/stop id, stop string, budget)."""
        now = time.perf_counter()
        if not self.tokens:
            self.stats.ttft_s = now - self.started
        self.tokens.append(token)
        self.raw.append(token)
        self.stats.emitted_tokens += 1
        self.stats.latency_s = now - self.started
        if token in self.stop_ids:
            self.finish_reason = "eos"
        elif self.stop_strings.hit(self.tokens):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.budget:
            self.finish_reason = "length"
        return self.done

    def emit_pad(self, pad_id: int) -> None:
        """A rejected PIPO draft: the pair's second slot is PAD, invisible to the user."""
        self.raw.append(pad_id)
        self.stats.pad_tokens += 1

    def completion(self, tokenizer) -> Completion:
        shown = self.tokens[:-1] if self.finish_reason == "eos" else self.tokens  # the EOS itself is not text
        text = tokenizer.decode(shown) if tokenizer is not None else ""
        if self.finish_reason == "stop":
            text = self.stop_strings.truncate(text)
        return Completion(self.tokens, text, self.finish_reason or "length", self.stats, self.raw)
