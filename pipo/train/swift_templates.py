"""ms-swift templates for PIPO: ChatML whose generation prompt ends with the thinking prefix, in pair layout.

The assistant turn's `<think>\\n` belongs to the *prompt* (Qwen3.5's chat template adds it
itself when it opens the assistant turn), so it is never supervised and the
prompt/response boundary is where decoding starts. Encoded rows then go through
`pair_layout`: prompt padded to even with PAD, even total length.

Rows of a `pipo cache` dataset are already encoded that way (`input_ids`, `labels`,
`lengths`, no `messages`); `encode` passes them through without touching the tokenizer,
so SFT from the cache trains on exactly the ids SFT from the jsonl would have produced.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from swift.template import MaxLengthError, Template, register_template
from swift.template.template_inputs import StdTemplateInputs
from swift.template.templates.utils import ChatmlTemplateMeta

from pipo.errors import PIPOError
from pipo.model.pairs import even_prompt, pair_layout

THINK_PREFIX = "<think>\n"
TEMPLATE_QWEN3_5 = "pipo_qwen3_5"
TEMPLATE_TINY = "pipo_tiny"


def is_pretokenized(row: Any) -> bool:
    """A `pipo cache` row: token ids instead of chat messages."""
    return isinstance(row, Mapping) and "input_ids" in row and "messages" not in row


class PIPOTemplate(Template):
    """Plain ChatML with `<think>\\n` in the generation prompt; rows come out in pair layout."""

    def encode(self, inputs, return_template_inputs: bool = False, return_length: bool = False) -> dict[str, Any]:
        if is_pretokenized(inputs):
            return self._encode_pretokenized(inputs, return_template_inputs, return_length)
        return super().encode(inputs, return_template_inputs, return_length)

    def _encode_pretokenized(self, row: Mapping[str, Any], return_template_inputs: bool, return_length: bool) -> dict[str, Any]:
        """A cached row as `encode` returns a freshly encoded training row (same keys), without the tokenizer.

        The cache applied its own `max_length`; a row longer than this run's limit is
        dropped like any over-long row (`MaxLengthError`) rather than cut, since cutting
        could split a pair.
        """
        if self.mode != "train" or return_template_inputs or "labels" not in row:
            raise PIPOError(
                "pre-tokenized (`pipo cache`) rows carry input_ids and labels only: they feed SFT training, "
                f"not template mode {self.mode!r}"
            )
        ids, labels = list(row["input_ids"]), list(row["labels"])
        if len(ids) != len(labels) or len(ids) % 2:
            raise PIPOError(
                f"cached row with {len(ids)} input ids and {len(labels)} labels is not in pair layout; "
                "rebuild the cache with `pipo cache`"
            )
        if self.max_length is not None and len(ids) > self.max_length:
            raise MaxLengthError(f"cached row of length {len(ids)} is longer than max_length={self.max_length}")
        encoded: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if return_length:
            encoded.update(length=len(ids), lengths=[len(ids)])
        return encoded

    def _normalise_response(self, content: str) -> str:
        """The assistant text after the prompt's `<think>\\n` (a leading copy in the data is dropped)."""
        return content.removeprefix(THINK_PREFIX)

    def _swift_prepare_inputs(self, inputs: StdTemplateInputs) -> None:
        for message in inputs.messages:
            if message.get("role") == "assistant" and isinstance(message.get("content"), str):
                message["content"] = self._normalise_response(message["content"])
        super()._swift_prepare_inputs(inputs)

    def _encode(self, inputs: StdTemplateInputs) -> dict[str, Any]:
        encoded = super()._encode(inputs)
        pad_id = self.tokenizer.pad_token_id
        if encoded.get("labels") is None:
            encoded["input_ids"] = even_prompt(encoded["input_ids"], pad_id)
        else:
            encoded["input_ids"], encoded["labels"] = pair_layout(encoded["input_ids"], encoded["labels"], pad_id)
            encoded["loss_scale"] = None  # PIPO supervises through labels only; per-token scales would misalign
        return encoded


class PIPOQwen3_5Template(PIPOTemplate):
    """Qwen3.5: the assistant turn rendered as its HF chat template does (trimmed, canonical `<think>` block)."""

    def _normalise_response(self, content: str) -> str:
        text = content.strip().removeprefix("<think>")
        if "</think>" not in text:
            return text.lstrip("\n")
        reasoning, _, rest = text.partition("</think>")
        return f"{reasoning.strip()}\n</think>\n\n{rest.lstrip(chr(10))}"


def _meta(template_type: str, template_cls: type[PIPOTemplate]) -> ChatmlTemplateMeta:
    return ChatmlTemplateMeta(
        template_type,
        prompt=["<|im_start|>user\n{{QUERY}}<|im_end|>\n<|im_start|>assistant\n" + THINK_PREFIX],
        template_cls=template_cls,
        default_system=None,
        auto_add_bos=False,
        stop_words=["<|endoftext|>"],
    )


def register_templates() -> None:
    """Register `pipo_qwen3_5` and `pipo_tiny` (the test/demo tokenizer); idempotent."""
    register_template(_meta(TEMPLATE_QWEN3_5, PIPOQwen3_5Template), exist_ok=True)
    register_template(_meta(TEMPLATE_TINY, PIPOTemplate), exist_ok=True)
