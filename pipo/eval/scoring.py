"""Score a generations JSONL: grade every completion, append one row per problem, write
metrics.json.

Resumable: each scored row is flushed as one line, so a killed run restarts where it
stopped (a half-written last line is cut off, problems already scored are skipped, none
is scored twice). Metrics are always computed from the whole scores file, so a resumed
run ends with the same metrics as an uninterrupted one.

A verdict is kept only for the completions it judged: each scores row holds the sha256
of its completions (`completions_sha256`), and the sidecar `<scores>.meta.json` the
grading settings (see `pipo.provenance`). Resuming against other completions or other
grading settings is an error naming the row, unless `overwrite` (then scoring starts over).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipo.data.problems import check_tests
from pipo.errors import InputError, PIPOError, RecordError
from pipo.eval.graders import DEFAULT_MATH_TIMEOUT_S, grade, grader_for
from pipo.eval.metrics import summarize
from pipo.eval.sandbox import SandboxConfig, SandboxUnavailable, die_with_parent, sandbox_mode
from pipo.jsonl import append_jsonl, drop_partial_last_line, numbered_jsonl, numbered_lines, parse_row, write_json
from pipo.provenance import exit_after_rows_for_test, sha256_json, start_or_resume

log = logging.getLogger(__name__)

FORMAT = "pipo-scores/2"
_REQUIRED_STATS = ("ttft_s", "latency_s", "emitted_tokens")
_OPTIONAL_STATS = ("prompt_tokens", "pad_tokens", "forward_passes", "drafted", "accepted")


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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Grade ``generations_path`` into ``scores_path`` (resuming it) and write metrics.

    ``model_label`` / ``method_label`` name the table row the metrics belong to (e.g.
    ``qwen3.5-4b`` / ``pipo-sft``): generation rows carry checkpoint paths, which differ
    between the base, SFT and OPD checkpoints of one model.

    Returns the metrics written to ``metrics_path``. Raises :class:`RecordError` on a
    malformed generation record, after saving every row scored before it.
    """
    if k < 1 or workers < 1:
        raise PIPOError(f"k and workers must be >= 1, got k={k}, workers={workers}")
    if workers > 4 * (os.cpu_count() or 1):
        raise PIPOError(f"workers {workers}: this machine has {os.cpu_count()} CPUs; use at most "
                        f"{4 * (os.cpu_count() or 1)}")
    if not math.isfinite(math_timeout_s) or math_timeout_s <= 0:
        raise PIPOError(f"math_timeout_s must be a finite number > 0, got {math_timeout_s}")
    generations_path, scores_path, metrics_path = Path(generations_path), Path(scores_path), Path(metrics_path)
    if not generations_path.is_file():
        raise PIPOError(f"{generations_path}: no such file")
    scores_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {"format": FORMAT, "math_timeout_s": math_timeout_s, "sandbox": _sandbox_settings(sandbox)}
    resumed = start_or_resume(scores_path, settings, {"generations": str(generations_path)}, overwrite=overwrite)
    scored = _scored_hashes(scores_path) if resumed else {}
    if scored and overwrite and not _same_completions(generations_path, scored):
        scores_path.unlink()  # verdicts made for other completions: start over (the settings record stays valid)
        scored = {}
    jobs = _pending_jobs(generations_path, scores_path, scored)
    score = partial(_score_job, sandbox=sandbox, math_timeout_s=math_timeout_s)
    with scores_path.open("a", encoding="utf-8") as out:
        bar = tqdm(_ordered_map(score, jobs, workers), desc="score", unit="problem",
                   initial=len(scored), disable=not progress)
        for written, row in enumerate(bar, start=1):
            append_jsonl(out, row)
            exit_after_rows_for_test(written)
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
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        if not line.endswith("\n"):
            raise RecordError(path, number, "truncated scores row (run was killed?)")
        row = parse_row(path, number, line)
        if "id" not in row or not isinstance(row.get("correct"), list):
            raise RecordError(path, number, "scores row without 'id' and 'correct' list")
        rows.append(row)
    return rows


def _key(row: Mapping[str, Any]) -> tuple[str, str]:
    return str(row.get("benchmark")), str(row["id"])


def _sandbox_settings(sandbox: SandboxConfig | None) -> dict[str, Any]:
    """The sandbox limits that change verdicts; None means the default limits, as the graders read it.

    Left out: the interpreter's path (it differs between machines) and `unsafe_no_sandbox` (a fallback
    when bubblewrap is missing, recorded in the metrics; a run refused for it resumes with it).
    """
    config = dataclasses.asdict(sandbox or SandboxConfig())
    return {k: v for k, v in config.items() if k not in ("python", "unsafe_no_sandbox")}


def _scored_hashes(path: Path) -> dict[tuple[str, str], tuple[int, str | None]]:
    """(benchmark, id) -> (scores line, completions sha256) of the rows already scored (cut last line repaired)."""
    return {_key(row): (number, row.get("completions_sha256"))
            for number, row in enumerate(read_scores(path, repair=True), start=1)}


def _same_completions(path: Path, scored: Mapping[tuple[str, str], tuple[int, str | None]]) -> bool:
    """Whether every problem already scored still has the completions its verdicts were made for."""
    for number, record in numbered_jsonl(path):
        job = _job_from_record(path, number, record)
        entry = scored.get(_key(job))
        if entry is not None and entry[1] != job["completions_sha256"]:
            return False
    return True


def _pending_jobs(path: Path, scores_path: Path,
                  scored: Mapping[tuple[str, str], tuple[int, str | None]]) -> Iterator[dict[str, Any]]:
    """Validated grading jobs for records not scored yet; a repeated problem, or one scored for other
    completions, is an error naming both places."""
    first: dict[tuple[str, str], int] = {}
    for number, record in numbered_jsonl(path):
        job = _job_from_record(path, number, record)
        key = _key(job)
        if key in first:
            raise RecordError(path, number, f"id: duplicate problem {key[1]!r} of {key[0]!r} "
                                            f"(first on line {first[key]})")
        first[key] = number
        if key in scored:
            scores_line, digest = scored[key]
            if digest != job["completions_sha256"]:
                raise InputError(f"the verdicts of {key[1]!r} were made for other completions than those on "
                                 f"{path}:{number}; pass --overwrite to start over", file=scores_path,
                                 row=scores_line, field="completions_sha256")
            continue
        yield job


def _job_from_record(path: Path, number: int, record: dict[str, Any]) -> dict[str, Any]:
    """Check one generation record (line `number` of `path`); keep only what grading and metrics need."""
    def fail(problem: str) -> RecordError:
        return RecordError(path, number, problem)

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
    if grader == "code":
        if not isinstance(record.get("tests"), dict):
            raise fail("code grading needs a 'tests' object")
        try:
            check_tests(record["tests"])
        except PIPOError as e:
            raise fail(str(e)) from None
    stats = _checked_stats(record.get("stats"), len(completions), fail)
    return {"id": record["id"], "benchmark": record["benchmark"], "method": record.get("method"),
            "model": record.get("model"), "grader": grader, "answer": record.get("answer"),
            "tests": record.get("tests"), "completions": completions, "stats": stats,
            "completions_sha256": sha256_json(completions)}


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
            "verdicts": [list(r.verdicts) for r in results], "stats": job["stats"],
            "completions_sha256": job["completions_sha256"]}


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
