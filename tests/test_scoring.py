"""Resumable scoring: errors name file and line, kills resume without duplicates."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipo.cli import main as pipo_main
from pipo.eval.scoring import RecordError, read_scores, score_generations
from pipo.provenance import EXIT_AFTER_ROWS_ENV
from tests.fixtures_code import children_of, host_processes_with, wait_for


def _stats(n: int, ttft: float = 0.1) -> list[dict]:
    return [{"prompt_tokens": 12, "emitted_tokens": 20 + i, "pad_tokens": i, "forward_passes": 11,
             "ttft_s": ttft, "latency_s": ttft + 1.0, "drafted": 10, "accepted": 7} for i in range(n)]


def _math(i: int) -> dict:
    answer = str(i * 3)
    return {"id": f"m{i}", "benchmark": "synthetic_math", "prompt": f"{i}*3?", "answer": answer,
            "tests": None, "metadata": {}, "method": "pipo", "model": "tiny",
            "completions": [rf"<think>{i}*3</think>\boxed{{{answer}}}", r"\boxed{-1}",
                            f"so {answer}", rf"\boxed{{{answer}.0}}"],
            "token_ids": [[1, 2]] * 4, "stats": _stats(4)}


def _mcq(i: int) -> dict:
    return {"id": f"q{i}", "benchmark": "synthetic_mcq", "prompt": "pick", "answer": "B", "tests": None,
            "metadata": {"choices": ["x", "y"]}, "method": "pipo", "model": "tiny",
            "completions": [r"\boxed{B}", r"\boxed{A}", r"\boxed{(b)}", "B"],
            "token_ids": [[1]] * 4, "stats": _stats(4, ttft=0.2)}


def _code(i: int) -> dict:
    good = f"print(int(input()) + {i})"
    return {"id": f"c{i}", "benchmark": "livecodebench", "prompt": "add", "answer": None,
            "tests": {"format": "stdin", "inputs": ["1\n", "5\n"], "outputs": [f"{1 + i}\n", f"{5 + i}\n"],
                      "fn_name": None, "time_limit_s": 2, "memory_mb": None},
            "metadata": {}, "method": "pipo", "model": "tiny",
            "completions": [f"```python\n{good}\n```", "```python\nprint(0)\n```"],
            "token_ids": [[1]] * 2, "stats": _stats(2)}


def _records() -> list[dict]:
    return [_math(1), _mcq(1), _code(1), _math(2), _mcq(2), _code(2), _math(3)]


def _write(path: Path, records: list, extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def _ids(path: Path) -> list[str]:
    return [row["id"] for row in read_scores(path)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Metrics of one uninterrupted run over all records."""
    tmp = tmp_path_factory.mktemp("reference")
    gens = _write(tmp / "gens.jsonl", _records())
    metrics = score_generations(gens, tmp / "scores.jsonl", tmp / "metrics.json", progress=False)
    assert _ids(tmp / "scores.jsonl") == [r["id"] for r in _records()]
    assert json.loads((tmp / "metrics.json").read_text()) == metrics
    return metrics


def test_uninterrupted_run_grades_and_summarises(reference):
    bench = reference["benchmarks"]
    assert bench["synthetic_math"]["avg@4"] == pytest.approx(0.75)  # box, box(.0), unboxed "so n"
    assert bench["synthetic_mcq"]["avg@4"] == pytest.approx(0.5)
    assert bench["livecodebench"]["avg@4"] == pytest.approx(0.5)
    assert "pass@4" not in bench["livecodebench"]  # only 2 samples per code problem
    assert bench["livecodebench"]["pass@2"] == pytest.approx(1.0)
    assert reference["overall"]["avg@4"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert reference["num_problems"] == 7
    assert reference["speed"]["accept_rate"] == pytest.approx(0.7)
    assert reference["methods"] == ["pipo"] and reference["models"] == ["tiny"]


def test_resume_after_a_kill_mid_write_gives_no_duplicates_and_same_metrics(tmp_path, reference):
    records = _records()
    scores, metrics_path = tmp_path / "scores.jsonl", tmp_path / "metrics.json"
    score_generations(_write(tmp_path / "part.jsonl", records[:3]), scores, metrics_path, progress=False)
    partial_row = json.dumps({"id": records[3]["id"], "benchmark": records[3]["benchmark"], "correct": [True]})
    with scores.open("a") as f:
        f.write(partial_row[: len(partial_row) // 2])  # killed halfway through a line
    full = _write(tmp_path / "gens.jsonl", records)
    resumed = score_generations(full, scores, metrics_path, progress=False)
    assert _ids(scores) == [r["id"] for r in records]
    assert resumed == reference
    again = score_generations(full, scores, metrics_path, progress=False)  # nothing left to do
    assert _ids(scores) == [r["id"] for r in records] and again == reference


@pytest.mark.slow
def test_resume_after_a_real_kill(tmp_path):
    """`pipo score` ends abruptly after 2 rows (`PIPO_TEST_EXIT_AFTER_ROWS`, as a kill would), then resumes."""
    codes = [_code(i) for i in range(5)]
    gens = _write(tmp_path / "gens.jsonl", codes)
    scores, metrics_path = tmp_path / "scores.jsonl", tmp_path / "metrics.json"
    cmd = [sys.executable, "-m", "pipo.cli", "score", "--generations", str(gens), "--scores", str(scores),
           "--metrics", str(metrics_path), "--no-progress"]
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), EXIT_AFTER_ROWS_ENV: "2"}
    (tmp_path / "tmp").mkdir()
    killed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == 75, killed.stderr[-2000:]
    assert _ids(scores) == [r["id"] for r in codes[:2]] and not metrics_path.exists()
    assert list((tmp_path / "tmp").iterdir()) == []  # sandboxes write no host files
    assert pipo_main(cmd[3:]) == 0
    assert _ids(scores) == [r["id"] for r in codes]
    uninterrupted = score_generations(gens, tmp_path / "s2.jsonl", tmp_path / "m2.json", progress=False)
    assert json.loads(metrics_path.read_text()) == uninterrupted


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"id": "x", "benchmark": "synthetic_math", "answer": "1"', "invalid JSON"),
        (json.dumps({"id": "x", "benchmark": "synthetic_math", "answer": "1"}), "'completions' must be"),
        (json.dumps({"id": "x", "benchmark": "synthetic_math", "answer": "1", "completions": [1, 2]}),
         "'completions' must be"),
        (json.dumps({"id": 7, "benchmark": "synthetic_math", "answer": "1", "completions": ["a"]}),
         "'id' must be a string"),
        (json.dumps({"id": "x", "benchmark": "nope", "answer": "1", "completions": ["a"]}), "no grader"),
        (json.dumps({"id": "x", "benchmark": "livecodebench", "completions": ["a"]}), "'tests' object"),
        (json.dumps({"id": "x", "benchmark": "synthetic_mcq", "answer": "A", "completions": ["a"],
                     "stats": [{"ttft_s": "fast", "latency_s": 1, "emitted_tokens": 1}]}), "stats[0].ttft_s"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_record_names_file_and_line_and_keeps_earlier_rows(tmp_path, bad_line, message):
    good = [_math(1), _mcq(1)]
    gens = _write(tmp_path / "gens.jsonl", good, extra_lines=(bad_line, json.dumps(_math(2))))
    scores = tmp_path / "scores.jsonl"
    with pytest.raises(RecordError, match=re.escape(message)) as info:
        score_generations(gens, scores, tmp_path / "metrics.json", progress=False)
    assert str(info.value).startswith(f"{gens}:3: ")
    assert info.value.line == 3
    assert _ids(scores) == ["m1", "q1"]
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow  # each worker process imports `pipo` (transformers) afresh
def test_worker_processes_keep_rows_before_a_bad_record_and_match_one_process(tmp_path, reference):
    records = _records()
    gens = _write(tmp_path / "gens.jsonl", records, extra_lines=("not json",))
    scores, metrics_path = tmp_path / "scores.jsonl", tmp_path / "metrics.json"
    with pytest.raises(RecordError, match=r"gens.jsonl:8: invalid JSON"):
        score_generations(gens, scores, metrics_path, workers=2, progress=False)
    assert _ids(scores) == [r["id"] for r in records]  # in input order, all before line 8
    assert score_generations(_write(gens, records), scores, metrics_path, progress=False) == reference


def test_duplicate_problems_are_an_error_naming_both_lines(tmp_path):
    gens = _write(tmp_path / "gens.jsonl", [_math(1), _mcq(1), _math(1)])
    with pytest.raises(RecordError, match=r"gens.jsonl:3: id: duplicate problem 'm1' .*first on line 1"):
        score_generations(gens, tmp_path / "s.jsonl", tmp_path / "m.json", progress=False)
    assert _ids(tmp_path / "s.jsonl") == ["m1", "q1"]


def test_cli_score(tmp_path, capsys):
    gens = _write(tmp_path / "gens.jsonl", [_math(1), _mcq(1)])
    args = ["score", "--generations", str(gens), "--scores", str(tmp_path / "s.jsonl"),
            "--metrics", str(tmp_path / "out" / "m.json"), "--k", "2", "--no-progress"]
    assert pipo_main(args) == 0
    metrics = json.loads((tmp_path / "out" / "m.json").read_text())
    assert metrics["k"] == 2 and "avg@2" in metrics["overall"]
    assert not [p for p in os.listdir(tmp_path / "out") if p != "m.json"]  # no temp files left
    bad = _write(tmp_path / "bad.jsonl", [], extra_lines=("{",))
    assert pipo_main(args[:1] + ["--generations", str(bad)] + args[3:]) == 2
    assert f"{bad}:1: invalid JSON" in capsys.readouterr().err


@pytest.mark.slow  # worker processes import `pipo` afresh
def test_kill_9_of_a_worker_pool_takes_workers_and_sandboxes_with_it(tmp_path):
    marker = "pipo-pool-sleeper-" + os.urandom(8).hex()
    sleeper = f"import os\nos.execv('/usr/bin/sleep', [{marker!r}, '300'])"
    records = []
    for i in range(4):
        record = _code(i)
        record["tests"]["time_limit_s"] = 100
        record["completions"] = [f"```python\n{sleeper}\n```"]
        record["stats"] = _stats(1)
        records.append(record)
    gens = _write(tmp_path / "gens.jsonl", records)
    (tmp_path / "tmp").mkdir()
    cmd = [sys.executable, "-m", "pipo.cli", "score", "--generations", str(gens), "--scores",
           str(tmp_path / "s.jsonl"), "--metrics", str(tmp_path / "m.json"), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    try:
        wait_for(lambda: len(host_processes_with(marker)) == 2, 120, "both workers to run a sandbox")
        workers = children_of(proc.pid)
        assert len(workers) >= 2, workers
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 30, "the workers to die")
    wait_for(lambda: not host_processes_with(marker), 30, "the sandboxed programs to die")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_score_refuses_code_without_a_sandbox_unless_unsafe_is_asked_for(tmp_path, monkeypatch, capsys):
    from pipo.eval.sandbox import UNSAFE, bubblewrap_problem

    gens = _write(tmp_path / "gens.jsonl", [_math(1), _code(1)])
    args = ["score", "--generations", str(gens), "--scores", str(tmp_path / "s.jsonl"),
            "--metrics", str(tmp_path / "m.json"), "--k", "2", "--no-progress"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on the PATH
    bubblewrap_problem.cache_clear()
    try:
        assert pipo_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "bwrap (bubblewrap) is not installed" in err[0] and "--unsafe-no-sandbox" in err[0]
        assert _ids(tmp_path / "s.jsonl") == ["m1"] and not (tmp_path / "m.json").exists()
        assert pipo_main(args + ["--unsafe-no-sandbox"]) == 0
        assert "WARNING: --unsafe-no-sandbox" in capsys.readouterr().err
        metrics = json.loads((tmp_path / "m.json").read_text())
        assert metrics["code_sandbox"] == UNSAFE and metrics["benchmarks"]["livecodebench"]["avg@2"] == 0.5
    finally:
        monkeypatch.undo()
        bubblewrap_problem.cache_clear()
    assert score_generations(gens, tmp_path / "s2.jsonl", tmp_path / "m2.json", progress=False)["code_sandbox"] \
        == "bubblewrap"
