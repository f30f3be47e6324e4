"""Training prompt sources (docs/method.md section 7): DAPO-Math-17k and Codeforces verifiable prompts.

Both come out as normalised records (`pipo.data.problems`), the input of teacher rollouts,
each tagged with its part (`metadata.split`): DAPO by position (the first 90% of rows feed
SFT, the last 10% are RL prompts), Codeforces by a stable hash of the problem id (90/10).
"""
from __future__ import annotations

import math
import re
from functools import partial
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pipo.data.problems import (
    INPUT_MODES,
    HubDataset,
    Record,
    code_prompt,
    code_tests,
    load_records,
    make_record,
    math_prompt,
    require,
    stable_seed,
)
from pipo.errors import PIPOError

DAPO_MATH = HubDataset("open-r1/DAPO-Math-17k-Processed", "all", "train", ("all/train-*.parquet",))
CODEFORCES_PROMPTS = HubDataset(
    "open-r1/codeforces", "verifiable-prompts", "train", ("verifiable-prompts/train-*.parquet",)
)
SFT_FRACTION = 0.9
CODEFORCES_LANGUAGES: tuple[str, ...] = ("python", "cpp")
CODEFORCES_FILES = ("input.txt", "output.txt")  # what file-input (`input_mode` "file") problems read and write

Split = Literal["sft", "rl", "all"]

# DAPO's own answer-format wrapper around each problem ("... Answer: $Answer ..."); it is
# replaced by the \boxed{} instruction of docs/method.md section 7 so training and evaluation prompts agree.
_DAPO_PREFIX = re.compile(r"^\s*Solve the following math problem step by step\..*?\n\n", re.DOTALL)
_DAPO_SUFFIX = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.?\s*$")


def dapo_question(prompt: str) -> str:
    """The bare problem of a DAPO prompt, without DAPO's answer-format instructions."""
    return _DAPO_SUFFIX.sub("", _DAPO_PREFIX.sub("", prompt, count=1)).strip()


def dapo_record(row: Mapping[str, Any], index: int, where: str) -> Record:
    """open-r1/DAPO-Math-17k-Processed rows: `prompt` (the bare problem, or the original one
    inside DAPO's "Answer:" wrapper: both give the same question), `solution` (the ground
    truth answer), `data_source`, `extra_info.index` (a UUID string: the record id; the row
    position when absent)."""
    extra = row.get("extra_info") or {}
    uid = extra.get("index") if isinstance(extra, Mapping) and extra.get("index") is not None else index
    return make_record(
        id=f"dapo_math/{uid}",
        benchmark="dapo_math",
        prompt=math_prompt(dapo_question(require(row, "prompt", where))),
        grader="math",
        answer=str(require(row, "solution", where)).strip(),
        metadata={"data_source": row.get("data_source"), "row": index},
    )


def _check_fraction(sft_fraction: float) -> None:
    if not 0.0 < sft_fraction < 1.0:
        raise PIPOError(f"sft_fraction must be in (0, 1), got {sft_fraction}")


def _check_split(name: str, split: str, sft_fraction: float) -> None:
    """One line naming the bad argument, before any data is read."""
    if split not in ("sft", "rl", "all"):
        raise PIPOError(f"{name} split must be 'sft', 'rl' or 'all', got {split!r}")
    _check_fraction(sft_fraction)


def _tag_parts(sft: Sequence[Record], rl: Sequence[Record]) -> None:
    """Record each record's part in `metadata.split` (what `pipo.data.build` reads)."""
    for part, records_of_part in (("sft", sft), ("rl", rl)):
        for record in records_of_part:
            record["metadata"]["split"] = part


def split_sft_rl(
    records: Sequence[Record], sft_fraction: float = SFT_FRACTION
) -> tuple[list[Record], list[Record]]:
    """First `sft_fraction` of the rows (by dataset order) for SFT, the rest for RL prompts."""
    _check_fraction(sft_fraction)
    cut = math.floor(len(records) * sft_fraction)
    return list(records[:cut]), list(records[cut:])


def load_dapo_math(
    source: str | Path | None = None,
    split: Split = "all",
    *,
    sft_fraction: float = SFT_FRACTION,
    limit: int | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> list[Record]:
    """DAPO-Math records of one split ("sft": first 90%, "rl": last 10%, or "all").

    The split is taken on the full dataset before `limit`, so it never depends on limit;
    each record's metadata carries its split.
    """
    _check_split("DAPO", split, sft_fraction)
    records = load_records(
        DAPO_MATH, dapo_record, source, name="dapo_math", revision=revision, cache_dir=cache_dir
    )
    sft, rl = split_sft_rl(records, sft_fraction)
    _tag_parts(sft, rl)
    chosen = {"sft": sft, "rl": rl, "all": sft + rl}[split]
    return chosen if limit is None else chosen[:limit]


def _statement(row: Mapping[str, Any], where: str) -> str:
    """A Codeforces problem statement assembled from its parts, with the examples."""
    parts = [f"{require(row, 'title', where)}\n\n{require(row, 'description', where)}"]
    for title, field in (("Input", "input_format"), ("Output", "output_format"), ("Note", "note")):
        if row.get(field):
            parts.append(f"{title}\n\n{row[field]}")
    for n, example in enumerate(row.get("examples") or [], start=1):
        parts.append(f"Example {n}\n\nInput:\n{example['input']}\nOutput:\n{example['output']}")
    return "\n\n".join(parts)


def hash_split(key: str, sft_fraction: float = SFT_FRACTION) -> str:
    """The part ("sft" or "rl") of `key` from a stable hash: the same in every process and
    whatever the dataset order, so a problem never moves between parts when rows are added."""
    _check_fraction(sft_fraction)
    return "sft" if stable_seed("sft-rl-split", key) / 2**64 < sft_fraction else "rl"


def codeforces_record(
    row: Mapping[str, Any],
    index: int,
    where: str,
    languages: Sequence[str] = CODEFORCES_LANGUAGES,
    sft_fraction: float = SFT_FRACTION,
) -> Record | None:
    """open-r1/codeforces `verifiable-prompts` rows -> code records graded by running the program.

    Fields (dataset card's features): id, contest_id, title, description, input_format,
    output_format, note, examples / official_tests (lists of {input, output}), time_limit (s),
    memory_limit (MB), interaction_format, input_mode ("stdio" or "file"), generated_checker
    (a Python judge for problems with several right answers), and `language` ("python" or
    "cpp": one row per problem and language; others are dropped). The statement is rebuilt
    rather than taking the dataset's `prompt`, so the answer format (one fenced block) is
    the one the project's grader reads. Interactive problems are dropped: no interactor runs.
    File-input problems read input.txt and write output.txt (Codeforces' names for them).
    Both languages of a problem land in the same SFT/RL part (`hash_split` of the problem id).
    """
    language = require(row, "language", where)
    if language not in languages:
        return None
    if row.get("interaction_format"):
        return None
    tests = row.get("official_tests") or row.get("examples") or []
    if not tests:
        return None
    mode = row.get("input_mode") or "stdio"
    if mode not in INPUT_MODES:
        raise PIPOError(f"{where}: field 'input_mode' must be one of {INPUT_MODES}, got {mode!r}")
    files = CODEFORCES_FILES if mode == "file" else (None, None)
    problem = str(require(row, "id", where))
    return make_record(
        id=f"codeforces/{problem}/{language}",
        benchmark="codeforces",
        prompt=code_prompt(_statement(row, where), language=language, input_file=files[0], output_file=files[1]),
        grader="code",
        tests=code_tests(
            "stdin",
            [t["input"] for t in tests],
            [t["output"] for t in tests],
            time_limit_s=row.get("time_limit"),
            memory_limit_mb=int(row["memory_limit"]) if row.get("memory_limit") else None,
            language=language,
            checker=row.get("generated_checker") or None,
            input_mode=mode,
            input_file=files[0],
            output_file=files[1],
        ),
        metadata={
            "problem": problem,
            "title": row.get("title"),
            "contest_id": row.get("contest_id"),
            "rating": row.get("rating"),
            "split": hash_split(problem, sft_fraction),
        },
    )


def load_codeforces_prompts(
    source: str | Path | None = None,
    split: Split = "all",
    *,
    languages: Sequence[str] = CODEFORCES_LANGUAGES,
    sft_fraction: float = SFT_FRACTION,
    limit: int | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> list[Record]:
    """Codeforces verifiable prompts (Python and C++ rows) as code records of one part:
    "sft" (about `sft_fraction` of the problems), "rl" (the rest) or "all"."""
    _check_split("Codeforces", split, sft_fraction)
    records = load_records(
        CODEFORCES_PROMPTS, partial(codeforces_record, languages=languages, sft_fraction=sft_fraction),
        source, name="codeforces", limit=limit if split == "all" else None, revision=revision, cache_dir=cache_dir,
    )
    chosen = [r for r in records if split == "all" or r["metadata"]["split"] == split]
    return chosen if limit is None else chosen[:limit]


def load_synthetic_prompts(
    limit: int | None = None, *, seed: int = 0, sft_fraction: float = SFT_FRACTION,
    task: Mapping[str, Any] | None = None,
) -> list[Record]:
    """The demo's stand-in for DAPO: generated training problems (difficulty `task`, the
    `synthetic.ArithmeticConfig` fields), split by position like DAPO."""
    from pipo.data import synthetic

    config = synthetic.ArithmeticConfig(**(task or {}))
    sft, rl = split_sft_rl(synthetic.train_records(limit or 1000, seed=seed, config=config), sft_fraction)
    _tag_parts(sft, rl)
    return sft + rl


def load_prompt_source(
    name: str,
    source: str | Path | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    sft_fraction: float = SFT_FRACTION,
    task: Mapping[str, Any] | None = None,
) -> list[Record]:
    """Rollout prompts of one configured dataset: `dapo_math`, `codeforces` or `synthetic` (demo, difficulty `task`)."""
    if name == "dapo_math":
        return load_dapo_math(source, "all", sft_fraction=sft_fraction, limit=limit)
    if name == "codeforces":
        return load_codeforces_prompts(source, "all", sft_fraction=sft_fraction, limit=limit)
    if name == "synthetic":
        return load_synthetic_prompts(limit, seed=seed, sft_fraction=sft_fraction, task=task)
    raise PIPOError(f"unknown prompt dataset {name!r}; known: dapo_math, codeforces, synthetic")
