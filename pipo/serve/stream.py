"""Text deltas from a growing token stream: safe to send, never taken back.

Decoding a token list gives text whose tail can still change: the last token may end in the
middle of a UTF-8 character (decoded as U+FFFD), and the tail may be the start of a stop
string that the engine will cut. So a delta is sent only up to the part that can no longer
change, and the rest follows at the end from the engine's final text.

Thinking models write `<think> ... </think>` before the answer (Qwen3.5's chat template puts
the opening tag in the prompt). With reasoning split on, the text before `</think>` goes to
`reasoning_content`, the rest to `content`, as vLLM's and SGLang's reasoning parsers do.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt_text: str) -> bool:
    """True when the prompt ends inside an open `<think>` block (the completion starts as reasoning)."""
    return prompt_text.rstrip().endswith(OPEN)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with (text that may become the tag)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """(reasoning, content) of a completion; reasoning is None when the completion does not think."""
    if not thinking:
        stripped = text.lstrip()
        if not stripped.startswith(OPEN):
            return None, text
        text = stripped[len(OPEN):]
    end = text.find(CLOSE)
    if end < 0:
        return text, ""
    return text[:end], text[end + len(CLOSE):].lstrip("\n")


class TextStream:
    """Deltas of one sample's text (and reasoning) as its tokens arrive."""

    def __init__(self, tokenizer, stops: tuple[str, ...], split: bool, thinking: bool) -> None:
        self.tokenizer = tokenizer
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.split, self.thinking = split, thinking
        self.sent_reasoning = self.sent_content = ""

    def _parts(self, text: str) -> tuple[str | None, str]:
        if not self.split:
            return None, text
        return split_reasoning(text, self.thinking)

    def _delta(self, text: str) -> tuple[str, str]:
        reasoning, content = self._parts(text)
        deltas = []
        for new, sent in ((reasoning or "", self.sent_reasoning), (content, self.sent_content)):
            deltas.append(new[len(sent):] if new.startswith(sent) else "")  # sent text is never taken back
        self.sent_reasoning += deltas[0]
        self.sent_content += deltas[1]
        return deltas[0], deltas[1]

    def push(self, token_ids: list[int]) -> tuple[str, str]:
        """(reasoning delta, content delta) for the tokens so far, holding back what may still change."""
        text = self.tokenizer.decode(token_ids)
        stable = len(text.rstrip("\ufffd")) - self.hold
        if self.split:
            stable -= max(_partial_suffix(text[:stable], CLOSE), _partial_suffix(text[:stable].lstrip(), OPEN))
        return self._delta(text[: max(stable, 0)]) if stable > 0 else ("", "")

    def finish(self, final_text: str) -> tuple[str, str]:
        """The rest of the engine's final text (stop strings already cut)."""
        return self._delta(final_text)

    @property
    def reasoning_started(self) -> bool:
        return self.split and (self.thinking or bool(self.sent_reasoning))
