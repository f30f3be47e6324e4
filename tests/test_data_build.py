"""Rollouts + grades -> SFT rows (shortest/all correct finished, no degenerate text) and RL rows (accuracy threshold)."""
from __future__ import annotations

import pytest

from pipo.data import build
from pipo.data.sources import load_prompt_source
from pipo.errors import PIPOError
from pipo.jsonl import write_jsonl
from pipo.train.validation import validate_jsonl

LOOP = "so " * 200


def rollout(id_: str, split: str, completions: list[str], reasons: list[str]) -> dict:
    return {"id": id_, "benchmark": "b", "prompt": f"Question {id_}?", "answer": "1", "tests": None,
            "metadata": {"grader": "math", "split": split}, "completions": completions, "finish_reasons": reasons,
            "token_ids": [[1]] * len(completions), "stats": [{}] * len(completions)}


@pytest.fixture
def graded(tmp_path):
    rollouts = write_jsonl(tmp_path / "r.jsonl", [
        rollout("a", "sft", ["long but right \\boxed{1}", "short \\boxed{1}", "tiny", LOOP + "\\boxed{1}"],
                ["eos", "eos", "length", "eos"]),
        rollout("b", "sft", ["wrong", "wrong"], ["eos", "eos"]),
        rollout("c", "rl", ["x", "y", "z", "w"], ["eos"] * 4),
        rollout("d", "rl", ["x", "y", "z", "w"], ["eos"] * 4),
    ])
    scores = write_jsonl(tmp_path / "s.jsonl", [
        {"id": "a", "correct": [True, True, True, True]},  # "tiny" unfinished, LOOP degenerate
        {"id": "b", "correct": [False, False]},
        {"id": "c", "correct": [True, True, False, False]},
        {"id": "d", "correct": [True, False, False, False]},
    ])
    return build.load_graded([rollouts], [scores])


def test_sft_rows_keep_shortest_or_all_correct_finished(graded, tmp_path):
    rows = build.sft_rows(graded, "shortest")
    assert [(r["id"], r["messages"][-1]["content"]) for r in rows] == [("a", "short \\boxed{1}")]
    assert rows[0]["messages"][0] == {"role": "user", "content": "Question a?"}
    every = build.sft_rows(graded, "all")
    assert [r["messages"][-1]["content"] for r in every] == ["long but right \\boxed{1}", "short \\boxed{1}"]
    assert validate_jsonl(write_jsonl(tmp_path / "sft.jsonl", every), "sft") == 2


def test_rl_rows_threshold_on_teacher_accuracy(graded, tmp_path):
    assert [r["id"] for r in build.rl_rows(graded, 0.5)] == ["c"]
    assert [r["id"] for r in build.rl_rows(graded, 0.25)] == ["c", "d"]
    rows = build.rl_rows(graded, 0.0)
    assert rows[0]["messages"] == [{"role": "user", "content": "Question c?"}]
    assert validate_jsonl(write_jsonl(tmp_path / "rl.jsonl", rows), "opd") == 2


def test_degenerate_text():
    assert build.is_degenerate(LOOP)
    assert not build.is_degenerate("short so so so")
    assert not build.is_degenerate(" ".join(f"{i} + {i + 1} = {2 * i + 1}." for i in range(60)))


def test_missing_verdicts_name_the_row(tmp_path):
    rollouts = write_jsonl(tmp_path / "r.jsonl", [rollout("a", "sft", ["x"], ["eos"])])
    scores = write_jsonl(tmp_path / "s.jsonl", [{"id": "other", "correct": [True]}])
    with pytest.raises(PIPOError, match=r"r\.jsonl:1: no verdicts for id 'a'"):
        build.load_graded([rollouts], [scores])


def test_shards_partition_the_rows():
    rows = list(range(7))
    assert sorted(sum((build.shard(rows, i, 3) for i in range(3)), [])) == rows
    with pytest.raises(PIPOError):
        build.shard(rows, 3, 3)


def test_synthetic_prompts_split_like_dapo():
    records = load_prompt_source("synthetic", limit=50, task={"ops": "+-", "max_operand": 9, "max_value": 40})
    assert [r["metadata"]["split"] for r in records] == ["sft"] * 45 + ["rl"] * 5
    assert all(r["metadata"]["grader"] in ("math", "mcq") for r in records)
