"""Fit long benchmark prompts into the model's prompt budget (LongBench v2's middle truncation).

Records whose `metadata.truncation` is "middle" (LongBench v2) are measured with the
evaluated model's tokenizer on the prompt as the engine encodes it (one user turn through
the chat template, generation prompt included). One that exceeds the budget keeps the first
and the last half of the allowed tokens of its text, as the official evaluation does
(THUDM/LongBench `pred.py`, `query_llm`: `input_ids[:max_len//2] + input_ids[-max_len//2:]`,
then decoded). Every such record gets `metadata.prompt_tokens = {original, kept, budget}`.

The budget defaults to `max_seq_len - max_new_tokens` (`prompt_budget`), so prompt and
completion always fit the engine's cache. It runs where the tokenizer is: the workflow's
generate rule (`pipo.workflow.generate_shard`) and `pipo benchmark --tokenizer`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipo.data.problems import Record
from pipo.errors import PIPOError

TRUNCATION_KEY = "truncation"  # metadata field: "middle" marks a record whose prompt may be cut


def prompt_budget(max_seq_len: int | None, max_new_tokens: int | None, budget: int | None = None,
                  cache_per_token: int = 1) -> int:
    """Prompt tokens allowed: `budget` when given, else `max_seq_len - cache_per_token * max_new_tokens` (the
    one default). `cache_per_token` is 2 for PIPO, whose cache also holds a PAD for each rejected draft."""
    if budget is not None:
        if budget < 2:
            raise PIPOError(f"prompt_budget must be >= 2 tokens, got {budget}")
        return int(budget)
    if max_seq_len is None or max_new_tokens is None:
        raise PIPOError("fitting long prompts needs prompt_budget, or max_seq_len and max_new_tokens")
    room = max_seq_len - cache_per_token * max_new_tokens
    if room < 2:
        raise PIPOError(f"max_seq_len={max_seq_len} leaves no prompt room after max_new_tokens={max_new_tokens}"
                        + (f" (x{cache_per_token} cache entries per new token)" if cache_per_token > 1 else ""))
    return int(room)


def section_budget(section: Mapping[str, Any], method: str = "regular") -> int:
    """`prompt_budget` of a workflow config section (eval or rollout) for a decoding method."""
    return prompt_budget(section.get("max_seq_len"), section.get("max_new_tokens"), section.get("prompt_budget"),
                         cache_per_token=2 if method == "pipo" else 1)


def needs_fitting(records: Sequence[Mapping[str, Any]]) -> bool:
    """True when some record asks for its prompt to be fitted to the budget."""
    return any((r.get("metadata") or {}).get(TRUNCATION_KEY) == "middle" for r in records)


def encoded_length(tokenizer: Any, text: str) -> int:
    """Tokens of `text` as one user turn, as the engine encodes it (chat template + generation prompt)."""
    from pipo.engine.parts import encode_prompt

    return len(encode_prompt(tokenizer, text))


def middle_truncate(tokenizer: Any, text: str, budget: int) -> tuple[str, int, int]:
    """`text` cut in the middle so its encoded length is <= `budget`; returns (text, original, kept).

    The chat template's own tokens are taken off the budget first; if decoding the cut ids
    re-encodes longer (merges across the cut), the kept share shrinks until it fits.
    """
    original = encoded_length(tokenizer, text)
    if original <= budget:
        return text, original, original
    ids = tokenizer.encode(text, add_special_tokens=False)
    overhead = original - len(ids)
    keep = budget - overhead
    while keep >= 2:
        head = keep // 2
        cut = tokenizer.decode(ids[:head] + ids[len(ids) - (keep - head):])
        kept = encoded_length(tokenizer, cut)
        if kept <= budget:
            return cut, original, kept
        keep -= kept - budget
    raise PIPOError(f"a prompt budget of {budget} tokens leaves no room for the text "
                    f"(the chat template alone takes {overhead})")


def fit_records(records: Sequence[Record], tokenizer: Any, budget: int) -> list[Record]:
    """Records with prompts marked for middle truncation fitted to `budget`; the others unchanged."""
    from tqdm.auto import tqdm

    fitted = []
    for record in tqdm(records, desc=f"fitting prompts to {budget} tokens", unit="record"):
        metadata = record.get("metadata") or {}
        if metadata.get(TRUNCATION_KEY) != "middle":
            fitted.append(record)
            continue
        prompt, original, kept = middle_truncate(tokenizer, record["prompt"], budget)
        tokens = {"original": original, "kept": kept, "budget": budget}
        fitted.append({**record, "prompt": prompt, "metadata": {**metadata, "prompt_tokens": tokens}})
    return fitted


def fit_to_model(records: Sequence[Record], model: str | Path, limits: Mapping[str, Any],
                 method: str = "regular") -> list[Record]:
    """`fit_records` with the tokenizer of checkpoint `model` and the budget of `limits` (keys
    prompt_budget / max_seq_len / max_new_tokens) for `method`; both are looked at only when a record needs them."""
    if not needs_fitting(records):
        return list(records)
    from transformers import AutoTokenizer

    budget = section_budget(limits, method)
    return fit_records(records, AutoTokenizer.from_pretrained(str(model)), budget)
