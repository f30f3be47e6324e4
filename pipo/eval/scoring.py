"""Score a generations JSONL: grade every completion, append one row per problem, write
metrics.json.

Resumable: each scored row is flushed as one line, so a killed run restarts where it
stopped (a half-written last line is cut off, problems already scored are skipped, none
is scored twice). Metrics are always computed from the whole scores file, so a resumed
run ends with the same metrics as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipo.data.records import append_jsonl, drop_partial_last_line, write_json
from pipo.errors import PIPOError
from pipo.eval.graders import DEFAULT_MATH_TIMEOUT_S, grade, grader_for
from pipo.eval.metrics import summarize
from pipo.eval.sandbox import SandboxConfig, SandboxUnavailable, die_with_parent, sandbox_mode

log = logging.getLogger(__name__)

_REQUIRED_STATS = ("ttft_s", "latency_s", "emitted_tokens")
_OPTIONAL_STATS = ("prompt_tokens", "pad_tokens", "forward_passes", "drafted", "accepted")


class RecordError(PIPOError):
    """A malformed line in a JSONL file; the message names the file and line."""

    def __init__(self, path: str | os.PathLike, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


def score_generations(
    generations_path: str | os.PathLike,
    scores_path: str | os.PathLike,
    metrics_path: str | os.PathLike,
    *,
    k: int = 4,
    workers: int = 1,
    sandbox: SandboxConfig | None = None,
    math_timeout_s: float = DEFAULT_MATH_TIMEOUT_S,
    progress: bool = True,
    model_label: str | None = None,
    method_label: str | None = None,
) -> dict[str, Any]:
    """Grade ``generations_path`` into ``scores_path`` (resuming it) and write metrics.

    ``model_label`` / ``method_label`` name the table row the metrics belong to (e.g.
    ``qwen3.5-4b`` / ``pipo-sft``): generation rows carry checkpoint paths, which differ
    between the base, SFT and OPD checkpoints of one model.

    Returns the metrics written to ``metrics_path``. Raises :class:`RecordError` on a
    malformed generation record, after saving every row scored before it.
    """
    if k < 1 or workers < 1:
        raise ValueError(f"k and workers must be >= 1, got k={k}, workers={workers}")
    scores_path, metrics_path = Path(scores_path), Path(metrics_path)
    scores_path.parent.mkdir(parents=True, exist_ok=True)
    scored = {_key(row) for row in read_scores(scores_path, repair=True)}
    jobs = _pending_jobs(Path(generations_path), scored)
    score = partial(_score_job, sandbox=sandbox, math_timeout_s=math_timeout_s)
    with scores_path.open("a", encoding="utf-8") as out:
        bar = tqdm(_ordered_map(score, jobs, workers), desc="score", unit="problem",
                   initial=len(scored), disable=not progress)
        for row in bar:
            append_jsonl(out, row)
    metrics = summarize(read_scores(scores_path), k)
    metrics["code_sandbox"] = _sandbox_description(sandbox or SandboxConfig())
    labels = {"model": model_label, "method": method_label}
    metrics.update({key: value for key, value in labels.items() if value is not None})
    if f"pass@{k}" not in metrics["overall"]:
        log.warning("pass@%d not reported: some problem has fewer than %d samples", k, k)
    write_json(metrics_path, metrics)
    return metrics


def read_scores(path: str | os.PathLike, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a scores JSONL (missing file: none). With ``repair``, a last line cut off
    by a kill (no trailing newline) is removed from the file first."""
    path = Path(path)
    if not path.exists():
        return []
    if repair and (dropped := drop_partial_last_line(path)):
        log.warning("%s: dropped a partial last line (%d bytes)", path, dropped)
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if not line.endswith("\n"):
                raise RecordError(path, number, "truncated scores row (run was killed?)")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(path, number, f"invalid JSON in scores row: {e}") from None
            if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("correct"), list):
                raise RecordError(path, number, "scores row without 'id' and 'correct' list")
            rows.append(row)
    return rows


def _key(row: Mapping[str, Any]) -> tuple[str, str]:
    return str(row.get("benchmark")), str(row["id"])


def _pending_jobs(path: Path, scored: set[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    """Validated grading jobs for records not scored yet (each problem once)."""
    seen = set(scored)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            job = _job_from_line(path, number, line)
            if _key(job) in seen:
                continue
            seen.add(_key(job))
            yield job


def _job_from_line(path: Path, number: int, line: str) -> dict[str, Any]:
    """Parse and check one generation record; keep only what grading and metrics need."""
    def fail(problem: str) -> RecordError:
        return RecordError(path, number, problem)

    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise fail(f"invalid JSON: {e}") from None
    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    for name in ("id", "benchmark"):
        if not isinstance(record.get(name), str):
            raise fail(f"{name!r} must be a string, got {record.get(name)!r}")
    completions = record.get("completions")
    if not isinstance(completions, list) or not completions or not all(isinstance(c, str) for c in completions):
        raise fail("'completions' must be a non-empty list of strings")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise fail("'metadata' must be an object")
    try:
        grader = grader_for(record["benchmark"], metadata)
    except ValueError as e:
        raise fail(str(e)) from None
    if grader in ("math", "mcq") and not isinstance(record.get("answer"), str):
        raise fail(f"{grader} grading needs a string 'answer', got {record.get('answer')!r}")
    if grader == "code" and not isinstance(record.get("tests"), dict):
        raise fail("code grading needs a 'tests' object")
    stats = _checked_stats(record.get("stats"), len(completions), fail)
    return {"id": record["id"], "benchmark": record["benchmark"], "method": record.get("method"),
            "model": record.get("model"), "grader": grader, "answer": record.get("answer"),
            "tests": record.get("tests"), "completions": completions, "stats": stats}


def _checked_stats(stats: Any, n: int, fail: Callable[[str], RecordError]) -> list[dict[str, Any]]:
    if stats is None:
        return []
    if not isinstance(stats, list) or len(stats) != n:
        raise fail(f"'stats' must be a list with one entry per completion ({n})")
    for i, stat in enumerate(stats):
        if not isinstance(stat, dict):
            raise fail(f"stats[{i}] must be an object")
        for name in _REQUIRED_STATS + _OPTIONAL_STATS:
            value = stat.get(name)
            if (value is None and name in _REQUIRED_STATS) or not isinstance(value, (int, float, type(None))) \
                    or isinstance(value, bool):
                raise fail(f"stats[{i}].{name} must be a number, got {value!r}")
    return stats


def _score_job(job: Mapping[str, Any], sandbox: SandboxConfig | None, math_timeout_s: float) -> dict[str, Any]:
    """One scores row: per-sample verdicts plus the generation stats (for speed metrics)."""
    results = [grade(job["grader"], text, answer=job["answer"], tests=job["tests"],
                     sandbox=sandbox, math_timeout_s=math_timeout_s)
               for text in job["completions"]]
    return {"id": job["id"], "benchmark": job["benchmark"], "method": job["method"],
            "model": job["model"], "grader": job["grader"],
            "correct": [r.correct for r in results], "reasons": [r.reason for r in results],
            "verdicts": [list(r.verdicts) for r in results], "stats": job["stats"]}


def _sandbox_description(config: SandboxConfig) -> str:
    """How code was (or would be) run, for the metrics: a run without a sandbox is marked."""
    try:
        return sandbox_mode(config)
    except SandboxUnavailable:
        return "unavailable"


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """``map`` in input order, on up to ``workers`` processes with a bounded look-ahead.

    If ``items`` raises (a malformed record), results already submitted are yielded
    first, so everything before the bad record gets saved.
    """
    if workers == 1:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
    # Workers (and through them their sandboxes) are killed with this process, even by kill -9.
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
        except Exception:
            while pending:
                yield pending.popleft().result()
            raise
        while pending:
            yield pending.popleft().result()
