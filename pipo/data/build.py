"""Teacher rollouts + grades -> SFT rows and RL prompt rows (docs/method.md section 7).

Inputs are what the DAG's rollout and grade rules write: `pipo generate` rows (the prompt
record plus `completions` and `finish_reasons`) and `pipo score` rows (`id` plus one
`correct` verdict per completion), joined by record id.

- SFT: per prompt of the SFT part, the shortest correct finished completion (or every
  correct one), dropping degenerate repetitive text; chat `messages` rows.
- RL: prompts of the RL part whose teacher mean accuracy is >= a threshold; prompt only.

A record's part is `metadata.split` ("rl" for RL prompts; anything else feeds SFT), as
set by the prompt sources (DAPO: first 90% SFT, last 10% RL).
"""
from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pipo.data.problems import Record
from pipo.errors import InputError, PIPOError
from pipo.jsonl import numbered_jsonl, write_jsonl

FINISHED = ("eos", "stop")  # engine finish reasons of a completion that ended by itself
RL_SPLIT = "rl"
SFTMode = Literal["shortest", "all"]
KINDS = ("sft", "rl")
FORMAT = "pipo-data/1"

# Degeneracy: text long enough to judge that zlib squeezes below this ratio is a loop
# ("so so so ...", a repeated paragraph). Normal reasoning compresses to ~0.3-0.5.
MIN_JUDGED_CHARS = 256
MAX_COMPRESSION = 0.12


@dataclass(frozen=True)
class Graded:
    """One prompt with its teacher completions and their verdicts."""

    record: Record
    completions: list[str]
    finished: list[bool]
    correct: list[bool]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    @property
    def split(self) -> str:
        return str(self.record.get("metadata", {}).get("split", "sft"))


def is_degenerate(text: str, min_chars: int = MIN_JUDGED_CHARS, max_ratio: float = MAX_COMPRESSION) -> bool:
    """True for long text that compresses too well: repetition loops, not reasoning."""
    data = text.encode("utf-8")
    return len(data) >= min_chars and len(zlib.compress(data, 9)) / len(data) < max_ratio


def _scores_by_id(paths: Iterable[str | Path]) -> dict[str, list[bool]]:
    verdicts: dict[str, list[bool]] = {}
    first: dict[str, str] = {}
    for path in paths:
        for lineno, row in numbered_jsonl(path):
            if "id" not in row or not isinstance(row.get("correct"), list):
                raise PIPOError(f"{path}:{lineno}: a scores row needs 'id' and a 'correct' list")
            key = str(row["id"])
            if key in first:
                raise InputError(f"duplicate id {key!r} (first at {first[key]})", file=path, row=lineno, field="id")
            first[key] = f"{path}:{lineno}"
            verdicts[key] = [bool(c) for c in row["correct"]]
    return verdicts


def load_graded(rollouts: Sequence[str | Path], scores: Sequence[str | Path]) -> list[Graded]:
    """Join rollout rows with their verdicts by id; a rollout without a verdict is an error naming it."""
    verdicts = _scores_by_id(scores)
    graded = []
    first: dict[str, str] = {}
    for path in rollouts:
        for lineno, row in numbered_jsonl(path):
            where = f"{path}:{lineno}"
            if str(row.get("id")) in first:
                raise InputError(f"duplicate id {row['id']!r} (first at {first[str(row['id'])]})", file=path,
                                 row=lineno, field="id")
            first[str(row.get("id"))] = where
            completions, reasons = row.get("completions"), row.get("finish_reasons")
            if "id" not in row or not isinstance(completions, list) or not isinstance(reasons, list):
                raise PIPOError(f"{where}: a rollout row needs 'id', 'completions' and 'finish_reasons'")
            correct = verdicts.get(str(row["id"]))
            if correct is None or len(correct) != len(completions):
                raise PIPOError(f"{where}: no verdicts for id {row['id']!r} with {len(completions)} completions in {list(scores)}")
            record = {k: v for k, v in row.items() if k not in ("completions", "finish_reasons", "token_ids", "stats")}
            graded.append(Graded(record, [str(c) for c in completions], [r in FINISHED for r in reasons], correct))
    return graded


def _user_message(record: Mapping[str, Any]) -> dict[str, str]:
    return {"role": "user", "content": str(record["prompt"])}


def sft_rows(graded: Iterable[Graded], mode: SFTMode = "shortest") -> list[dict[str, Any]]:
    """Chat rows from the SFT part: the shortest good completion per prompt, or all good ones."""
    if mode not in ("shortest", "all"):
        raise PIPOError(f"SFT selection must be 'shortest' or 'all', got {mode!r}")
    rows = []
    for item in graded:
        if item.split == RL_SPLIT:
            continue
        good = [
            text for text, ok, done in zip(item.completions, item.correct, item.finished)
            if ok and done and text.strip() and not is_degenerate(text)
        ]
        chosen = [min(good, key=len)] if mode == "shortest" and good else good
        for text in chosen:
            rows.append({"id": item.record["id"],
                         "messages": [_user_message(item.record), {"role": "assistant", "content": text}]})
    return rows


def rl_rows(graded: Iterable[Graded], min_accuracy: float = 0.5) -> list[dict[str, Any]]:
    """Prompt-only rows from the RL part whose teacher mean accuracy is >= `min_accuracy`."""
    if not 0.0 <= min_accuracy <= 1.0:
        raise PIPOError(f"min_accuracy must be in [0, 1], got {min_accuracy}")
    return [
        {"id": item.record["id"], "messages": [_user_message(item.record)]}
        for item in graded
        if item.split == RL_SPLIT and item.accuracy >= min_accuracy
    ]


def shard(rows: Sequence[Any], index: int, count: int) -> list[Any]:
    """Rows `index, index + count, ...`: shards of equal size whatever the order of difficulty."""
    if not 0 <= index < count:
        raise PIPOError(f"shard index must be in [0, {count}), got {index}")
    return list(rows[index::count])


class BuiltData(NamedTuple):
    graded: list[Graded]
    rows: list[dict[str, Any]]
    written: bool


def build_data_file(
    kind: str,
    rollouts: Sequence[str | Path],
    scores: Sequence[str | Path],
    output: str | Path,
    *,
    sft_selection: SFTMode = "shortest",
    rl_min_accuracy: float = 0.5,
    overwrite: bool = False,
) -> BuiltData:
    """Write SFT (`kind="sft"`) or RL rows from graded rollouts to `output`, with its settings sidecar.

    An output already built from the same inputs and settings is kept (`written` False);
    one built otherwise is an error unless `overwrite`.
    """
    from pipo.provenance import sha256_file, start_or_resume

    if kind not in KINDS:
        raise PIPOError(f"kind must be one of {KINDS}, got {kind!r}")
    settings = {
        "format": FORMAT,
        "kind": kind,
        "selection": sft_selection if kind == "sft" else rl_min_accuracy,
        "rollouts_sha256": [sha256_file(p) for p in rollouts],
        "scores_sha256": [sha256_file(p) for p in scores],
    }
    graded = load_graded(rollouts, scores)  # inputs checked before the output is touched
    rows = sft_rows(graded, sft_selection) if kind == "sft" else rl_rows(graded, rl_min_accuracy)
    info = {"rollouts": [str(p) for p in rollouts], "scores": [str(p) for p in scores]}
    if start_or_resume(output, settings, info, overwrite=overwrite):
        return BuiltData(graded, rows, written=False)
    write_jsonl(output, rows)
    return BuiltData(graded, rows, written=True)
