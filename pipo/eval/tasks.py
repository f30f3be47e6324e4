"""Evaluation benchmarks (docs/method.md section 7): load each one into normalised records.

Every loader reads either the Hugging Face Hub (default) or a local copy saved in
the hub's file layout, and returns records in the schema of `pipo.data.problems`.
`BENCHMARKS` maps a benchmark name to its loader; `load_benchmark` is the entry point.
"""
from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from collections.abc import Callable, Mapping
from datetime import date, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from pipo.data import synthetic
from pipo.data.problems import (
    HubDataset,
    Record,
    code_prompt,
    code_tests,
    load_records,
    make_record,
    math_prompt,
    mcq_prompt,
    read_records,
    shuffled_choices,
    require,
)
from pipo.errors import PIPOError
from pipo.eval.truncation import TRUNCATION_KEY

AIME25 = HubDataset("math-ai/aime25", None, "test", ("test.jsonl",))
GPQA_DIAMOND = HubDataset("Idavidrein/gpqa", "gpqa_diamond", "train", ("gpqa_diamond.csv",))
# The Hub loader of code_generation_lite is a script (gone in datasets >= 4); release_v6
# is the union of these JSONL files (from the repo's code_generation_lite.py).
LIVECODEBENCH_V6 = HubDataset(
    "livecodebench/code_generation_lite",
    "release_v6",
    "test",
    ("test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl"),
    script_based=True,
)
LONGBENCH_V2 = HubDataset("zai-org/LongBench-v2", None, "train", ("data.json",))

LCB_MIN_DATE = date(2025, 2, 1)


class BenchmarkLoader(Protocol):
    """What every entry of BENCHMARKS is called with."""

    def __call__(
        self,
        source: str | Path | None = None,
        *,
        seed: int = 0,
        limit: int | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> list[Record]: ...


# (row, where, global seed) -> record, or None to drop the row
RowNormaliser = Callable[[Mapping[str, Any], str, int], Record | None]


def _load(
    name: str,
    spec: HubDataset,
    to_record: RowNormaliser,
    source: str | Path | None = None,
    *,
    seed: int = 0,
    limit: int | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> list[Record]:
    """Shared body of the hub-backed loaders: read rows, normalise, keep `limit`."""
    return load_records(
        spec, lambda row, _, at: to_record(row, at, seed), source,
        name=name, limit=limit, revision=revision, cache_dir=cache_dir,
    )


# ------------------------------------------------------------------------ AIME 2025


def aime25_record(row: Mapping[str, Any], where: str, seed: int) -> Record:
    """math-ai/aime25 rows: fields `id`, `problem`, `answer` (assumed from the hub viewer)."""
    return make_record(
        id=f"aime25/{require(row, 'id', where)}",
        benchmark="aime25",
        prompt=math_prompt(require(row, "problem", where)),
        grader="math",
        answer=str(require(row, "answer", where)).strip(),
    )


# --------------------------------------------------------------------- GPQA-Diamond


def gpqa_record(row: Mapping[str, Any], where: str, seed: int) -> Record:
    """Idavidrein/gpqa CSV rows: `Record ID`, `Question`, `Correct Answer`, `Incorrect Answer 1..3`."""
    qid = str(require(row, "Record ID", where)).strip()
    correct = str(require(row, "Correct Answer", where)).strip()
    incorrect = [str(require(row, f"Incorrect Answer {i}", where)).strip() for i in (1, 2, 3)]
    choices, letter = shuffled_choices(correct, incorrect, seed, qid)
    return make_record(
        id=f"gpqa_diamond/{qid}",
        benchmark="gpqa_diamond",
        prompt=mcq_prompt(require(row, "Question", where), choices),
        grader="mcq",
        answer=letter,
        metadata={"choices": choices, "domain": row.get("High-level domain")},
    )


# ------------------------------------------------------------------- LiveCodeBench


class _StrOnlyUnpickler(pickle.Unpickler):
    """LCB pickles a plain JSON string: refuse any class so hub data cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from test data")


def decode_lcb_tests(value: str) -> list[dict[str, Any]]:
    """LCB test cases: plain JSON, or (private ones) base64 of zlib of a pickled JSON string.

    Mirrors lcb_runner/benchmarks/code_generation.py (CodeGenerationProblem.__post_init__).
    """
    if not value:
        return []
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raw = zlib.decompress(base64.b64decode(value.encode("utf-8")))
        return json.loads(_StrOnlyUnpickler(io.BytesIO(raw)).load())


def _as_date(value: Any, where: str) -> date:
    """contest_date arrives as an ISO string (JSONL) or a timestamp (parquet)."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return datetime.fromisoformat(str(value)).date()
    except ValueError as exc:
        raise PIPOError(f"{where}: field 'contest_date' is not an ISO date: {value!r}") from exc


def lcb_record(
    row: Mapping[str, Any], where: str, seed: int, *, min_date: date = LCB_MIN_DATE
) -> Record | None:
    """livecodebench/code_generation_lite rows; problems before `min_date` are dropped.

    The cut compares the calendar date of the timestamp as given (LCB's ISO strings carry no
    time zone, and none is applied): `2025-01-31T18:30:00` falls before a 2025-02-01 window
    and `2025-02-01T00:00:00` inside it.
    """
    contest_date = _as_date(require(row, "contest_date", where), where)
    if contest_date < min_date:
        return None
    tests = decode_lcb_tests(row.get("public_test_cases") or "")
    tests += decode_lcb_tests(row.get("private_test_cases") or "")
    if not tests:
        raise PIPOError(f"{where}: no public or private test cases")
    kinds = {t.get("testtype") for t in tests}
    if len(kinds) != 1 or not kinds <= {"stdin", "functional"}:
        found = sorted(map(str, kinds))
        raise PIPOError(f"{where}: expected one testtype among stdin/functional, got {found}")
    fmt = kinds.pop()
    meta = json.loads(row.get("metadata") or "{}")
    starter = row.get("starter_code") or ""
    if fmt == "functional" and not meta.get("func_name"):
        raise PIPOError(f"{where}: functional problem without metadata.func_name")
    qid = str(require(row, "question_id", where))
    return make_record(
        id=f"livecodebench/{qid}",
        benchmark="livecodebench",
        prompt=code_prompt(require(row, "question_content", where), starter if fmt == "functional" else None),
        grader="code",
        tests=code_tests(
            fmt,
            [t["input"] for t in tests],
            [t["output"] for t in tests],
            fn_name=meta.get("func_name") if fmt == "functional" else None,
        ),
        metadata={
            "title": row.get("question_title"),
            "platform": row.get("platform"),
            "contest_id": row.get("contest_id"),
            "contest_date": contest_date.isoformat(),
            "difficulty": row.get("difficulty"),
            "starter_code": starter,
        },
    )


# ------------------------------------------------------------------ LongBench v2


def longbench_record(row: Mapping[str, Any], where: str, seed: int, *, length: str = "short") -> Record | None:
    """zai-org/LongBench-v2 rows (data.json); only the `length` subset is kept.

    Choices keep the dataset's order (the answer letter is given); the framing of the
    context follows the official LongBench v2 prompt. Contexts reach 841K characters, so
    the record is marked for middle truncation to the evaluated model's prompt budget
    (`pipo.eval.truncation`, run where the tokenizer is).
    """
    if require(row, "length", where) != length:
        return None
    choices = [str(require(row, f"choice_{letter}", where)) for letter in "ABCD"]
    question = (
        "Please read the following text and answer the question below.\n\n"
        f"<text>\n{require(row, 'context', where)}\n</text>\n\n"
        f"What is the correct answer to this question: {require(row, 'question', where)}"
    )
    return make_record(
        id=f"longbench_v2/{require(row, '_id', where)}",
        benchmark="longbench_v2",
        prompt=mcq_prompt(question, choices),
        grader="mcq",
        answer=str(require(row, "answer", where)).strip(),
        metadata={
            "choices": choices,
            "domain": row.get("domain"),
            "sub_domain": row.get("sub_domain"),
            "difficulty": row.get("difficulty"),
            "length": row.get("length"),
            TRUNCATION_KEY: "middle",
        },
    )


# --------------------------------------------------------------- synthetic (demo)


def _synthetic_loader(kind: str) -> BenchmarkLoader:
    """Demo benchmarks: a JSONL of records written by the DAG, or generated when no source."""

    def load(
        source: str | Path | None = None,
        *,
        seed: int = 0,
        limit: int | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> list[Record]:
        if source is None:
            return synthetic.eval_records(limit or synthetic.DEFAULT_TEST_SIZE, seed=seed, kind=kind)
        records = read_records(source)
        return records if limit is None else records[:limit]

    return load


BENCHMARKS: dict[str, BenchmarkLoader] = {
    "aime25": partial(_load, "aime25", AIME25, aime25_record),
    "gpqa_diamond": partial(_load, "gpqa_diamond", GPQA_DIAMOND, gpqa_record),
    "livecodebench": partial(_load, "livecodebench", LIVECODEBENCH_V6, lcb_record),
    "longbench_v2": partial(_load, "longbench_v2", LONGBENCH_V2, longbench_record),
    "synthetic_math": _synthetic_loader("math"),
    "synthetic_mcq": _synthetic_loader("mcq"),
}


def load_benchmark(
    name: str,
    source: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    task: Mapping[str, Any] | None = None,
) -> list[Record]:
    """Load benchmark `name` from a hub id or local path (None: its default hub repo).

    `task` sets the difficulty of generated synthetic benchmarks (`synthetic.ArithmeticConfig`
    fields), so the demo evaluates on the task its models were trained on.
    """
    if name not in BENCHMARKS:
        raise PIPOError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    if task and source is None and name.startswith("synthetic_"):
        config = synthetic.ArithmeticConfig(**task)
        kind = name.removeprefix("synthetic_")
        return synthetic.eval_records(limit or synthetic.DEFAULT_TEST_SIZE, seed=seed, kind=kind, config=config)
    return BENCHMARKS[name](source, seed=seed, limit=limit, revision=revision, cache_dir=cache_dir)
