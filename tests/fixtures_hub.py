"""Small datasets in the real Hugging Face Hub schemas and file layouts, written to tmp dirs.

Each `write_*` function lays files out as the hub repo does (so loaders read them
through the same local-snapshot path as a real download) and returns the raw rows.
"""
from __future__ import annotations

import base64
import json
import pickle
import socket
import uuid
import zlib
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def block_network(monkeypatch: Any) -> None:
    """Make any socket connection fail, so a test that reaches the network fails loudly."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


# ---------------------------------------------------------------- math-ai/aime25


def write_aime25(root: Path, n: int = 3) -> list[dict[str, Any]]:
    """test.jsonl with fields id, problem, answer."""
    rows = [{"id": str(i), "problem": f"Find the sum of {i} and {i + 1}.", "answer": str(2 * i + 1)} for i in range(n)]
    _jsonl(root / "test.jsonl", rows)
    return rows


# -------------------------------------------------------- Idavidrein/gpqa (diamond)


def write_gpqa_diamond(root: Path, n: int = 8) -> list[dict[str, Any]]:
    """gpqa_diamond.csv with the real column names (a subset of the extra ones)."""
    rows = [
        {
            "Pre-Revision Question": f"old question {i}",
            "Question": f"Which value is right for item {i}?\nThink, then answer.",
            "Correct Answer": f" right {i}\n",
            "Incorrect Answer 1": f"wrong {i}a",
            "Incorrect Answer 2": f"wrong {i}b",
            "Incorrect Answer 3": f"wrong, {i}c",
            "Explanation": "because",
            "Record ID": f"rec{i:04d}",
            "High-level domain": "Physics",
            "Subdomain": "Optics",
        }
        for i in range(n)
    ]
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "gpqa_diamond.csv", index=False)
    return rows


# ----------------------------------------------- livecodebench/code_generation_lite


def encode_lcb_private(tests: list[dict[str, str]]) -> str:
    """How LCB ships private tests: base64(zlib(pickle(json string)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode("utf-8")


def lcb_row(question_id: str, contest_date: str, functional: bool = False) -> dict[str, Any]:
    """One LCB row; functional problems carry starter code and metadata.func_name."""
    testtype = "functional" if functional else "stdin"
    # functional inputs: one JSON argument per line; stdin inputs: the raw text
    if functional:
        cases = [("1\n2", "3"), ("5\n7", "12"), ("0\n0", "0")]
    else:
        cases = [("1 2\n", "3\n"), ("5 7\n", "12\n"), ("0 0\n", "0\n")]
    tests = [{"input": i, "output": o, "testtype": testtype} for i, o in cases]
    return {
        "question_title": f"Add {question_id}",
        "question_content": f"Print the sum of two integers ({question_id}).",
        "platform": "leetcode" if functional else "atcoder",
        "question_id": question_id,
        "contest_id": f"contest-{question_id}",
        "contest_date": contest_date,
        "starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        " if functional else "",
        "difficulty": "easy",
        "public_test_cases": json.dumps(tests[:1]),
        "private_test_cases": encode_lcb_private(tests[1:]),
        "metadata": json.dumps({"func_name": "add"} if functional else {}),
    }


def write_livecodebench(root: Path) -> list[dict[str, Any]]:
    """Rows across two of the release files, on both sides of the 2025-02-01 cut, with times
    of day next to it (18:30 the day before is 00:00 the next day in UTC+5:30)."""
    old = [
        lcb_row("old1", "2024-12-01T00:00:00"),
        lcb_row("edge-1830", "2025-01-31T18:30:00"),
        lcb_row("edge-before", "2025-01-31T23:59:59"),
    ]
    new = [
        lcb_row("edge-on", "2025-02-01T00:00:00"),
        lcb_row("new-stdin", "2025-03-15T00:00:00"),
        lcb_row("new-func", "2025-04-02T00:00:00", functional=True),
    ]
    _jsonl(root / "test.jsonl", old)
    _jsonl(root / "test6.jsonl", new)
    return old + new


# ------------------------------------------------------------ zai-org/LongBench-v2


def longbench_row(i: int, length: str = "short", context: str | None = None) -> dict[str, Any]:
    """One data.json item; the context says which colour is right unless one is given."""
    colour = ["red", "green", "blue", "black"][i % 4]
    return {
        "_id": f"lb{i}",
        "domain": "Single-Document QA",
        "sub_domain": "Academic",
        "difficulty": "easy",
        "length": length,
        "question": f"What colour is object {i}?",
        "choice_A": "red",
        "choice_B": "green",
        "choice_C": "blue",
        "choice_D": "black",
        "answer": "ABCD"[i % 4],
        "context": context if context is not None else f"A long document {i}. Object {i} is {colour}.",
    }


def write_longbench_v2(root: Path, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """data.json (one JSON list); by default short, medium and long items."""
    rows = rows or [longbench_row(i, length) for i, length in enumerate(["short", "medium", "short", "long", "short"])]
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.json").write_text(json.dumps(rows), encoding="utf-8")
    return rows


# ------------------------------------------------ open-r1/DAPO-Math-17k-Processed

DAPO_WRAP = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "{q}\n\nRemember to put your answer on its own line after \"Answer:\"."
)


def write_dapo_math(root: Path, n: int = 20) -> list[dict[str, Any]]:
    """all/train-00000-of-00001.parquet with the processed dataset's columns: `extra_info.index`
    a UUID string; `prompt` the bare problem on even rows, inside DAPO's "Answer:" wrapper on odd ones."""
    rows = []
    for i in range(n):
        wrapped = DAPO_WRAP.format(q=f"What is {i} squared?")
        rows.append(
            {
                "prompt": wrapped if i % 2 else f"What is {i} squared?",
                "solution": str(i * i),
                "data_source": "math_dapo",
                "source_prompt": [{"content": wrapped, "role": "user"}],
                "ability": "MATH",
                "reward_model": {"ground_truth": str(i * i), "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": str(uuid.UUID(int=i + 1, version=4))},
            }
        )
    _parquet(root / "all" / "train-00000-of-00001.parquet", rows)
    return rows


# ----------------------------------------------- open-r1/codeforces (verifiable-prompts)


# A generated_checker in the dataset's contract (`python checker.py input.txt
# correct_output.txt solution_output.txt`, printing 1 to accept, 0 to reject, as graders of
# open-r1/codeforces call it). This one accepts any two numbers that sum to the expected one.
SUM_CHECKER = """import sys
input_path, expected_path, output_path = sys.argv[1:4]
want = int(open(expected_path).read().split()[0])
got = open(output_path).read().split()
print(1 if len(got) == 2 and int(got[0]) + int(got[1]) == want else 0)
"""


def codeforces_row(
    pid: str, language: str = "python", *, interactive: bool = False, checker: str | None = None,
    input_mode: str = "stdio",
) -> dict[str, Any]:
    """One verifiable-prompts row (the dataset's columns that loaders use, plus a few more)."""
    return {
        "id": pid,
        "aliases": None,
        "contest_id": pid.split("/")[0],
        "contest_name": "Round",
        "contest_type": "CF",
        "index": pid.split("/")[1],
        "time_limit": 2.0,
        "memory_limit": 256.0,
        "title": f"Problem {pid}",
        "description": "Given a and b, print a + b.",
        "input_format": "Two integers a and b.",
        "output_format": "One integer.",
        "interaction_format": "Talk to the jury." if interactive else None,
        "note": None,
        "examples": [{"input": "1 2\n", "output": "3\n"}],
        "rating": 800,
        "tags": ["math"],
        "official_tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "4 5\n", "output": "9\n"}],
        "official_tests_complete": True,
        "input_mode": input_mode,
        "generated_checker": checker,
        "executable": True,
        "prompt": f"You are given a problem ({language}) ...",
        "language": language,
    }


def write_codeforces_prompts(root: Path, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """verifiable-prompts/train-00000-of-00001.parquet; by default python and cpp rows of one
    problem, a checker problem (several right outputs), a file-input one and an interactive one."""
    rows = rows or [
        codeforces_row("1/A"),
        codeforces_row("1/A", language="cpp"),
        codeforces_row("2/B", language="cpp", checker=SUM_CHECKER),
        codeforces_row("3/C", interactive=True),
        codeforces_row("4/D", input_mode="file"),
    ]
    _parquet(root / "verifiable-prompts" / "train-00000-of-00001.parquet", rows)
    return rows
