"""The demo's synthetic arithmetic task: reproducible, correct, and with disjoint splits."""
from __future__ import annotations

import ast
import operator
import re

import pytest

from pipo.data import synthetic
from pipo.data.problems import LETTERS, validate_record

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> int:
    """An independent evaluator: Python's own parser, restricted to + - * on integers."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unexpected node {ast.dump(node)}")

    return walk(ast.parse(expression, mode="eval").body)


def _expression(prompt: str) -> str:
    match = re.match(r"Compute (.+)\.\n?", prompt)
    assert match, prompt
    return match.group(1)


def test_seeded_reproducibility() -> None:
    assert synthetic.pretraining_corpus(50, seed=1) == synthetic.pretraining_corpus(50, seed=1)
    assert synthetic.eval_records(20, seed=1, kind="mcq") == synthetic.eval_records(20, seed=1, kind="mcq")
    assert synthetic.sft_rows(20, seed=1) != synthetic.sft_rows(20, seed=2)


def test_example_format() -> None:
    step = synthetic.Step
    problem = synthetic.Problem(17, (step(17, "+", 5), step(22, "*", 3), step(66, "-", 8)))
    assert problem.question == "Compute ((17 + 5) * 3) - 8."
    assert problem.solution == "17 + 5 = 22. 22 * 3 = 66. 66 - 8 = 58. \\boxed{58}"


def test_answers_and_working_are_correct() -> None:
    config = synthetic.ArithmeticConfig(min_steps=1, max_steps=5, max_operand=30)
    for record in synthetic.records(300, seed=5, kind="math", config=config):
        validate_record(record)
        expression = _expression(record["prompt"])
        assert int(record["answer"]) == evaluate(expression) >= 0
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", record["metadata"]["solution"])
        assert steps and all(evaluate(f"{a} {op} {b}") == int(r) for a, op, b, r in steps)
        assert record["metadata"]["solution"].endswith(f"\\boxed{{{record['answer']}}}")
        assert 1 <= len(steps) <= 5 and max(int(x) for s in steps for x in (s[0], s[2], s[3])) <= config.max_value


def test_splits_are_disjoint() -> None:
    tests = synthetic.eval_records(200, seed=0) + synthetic.eval_records(200, seed=9, kind="mcq")
    test_expressions = {_expression(r["prompt"]) for r in tests}
    training_texts = (
        synthetic.pretraining_corpus(2000, seed=0)
        + [row["messages"][0]["content"] for row in synthetic.sft_rows(2000, seed=9)]
        + [row["messages"][0]["content"] for row in synthetic.rl_rows(2000, seed=4)]
    )
    training_expressions = {_expression(text) for text in training_texts}
    assert len(test_expressions) > 300  # two seeds: mostly different problems
    assert not test_expressions & training_expressions
    assert all(r["metadata"]["split"] == "test" for r in tests)


def test_mcq_letter_matches_answer() -> None:
    records = synthetic.eval_records(100, seed=2, kind="mcq")
    letters = set()
    for record in records:
        validate_record(record)
        choices = record["metadata"]["choices"]
        correct = str(evaluate(_expression(record["prompt"])))
        assert len(choices) == len(set(choices)) == 4 and choices.count(correct) == 1
        assert choices[LETTERS.index(record["answer"])] == correct
        assert f"{record['answer']}) {correct}" in record["prompt"]
        assert record["metadata"]["solution"].endswith(f"\\boxed{{{record['answer']}}}")
        letters.add(record["answer"])
    assert letters == set("ABCD")


def test_reference_solutions_pass_the_project_graders() -> None:
    from pipo.eval.graders import grade

    for record in synthetic.eval_records(10, kind="math") + synthetic.eval_records(10, kind="mcq"):
        solution = record["metadata"]["solution"]
        assert grade(record["metadata"]["grader"], solution, answer=record["answer"]).correct, record
    wrong = synthetic.eval_records(1, kind="mcq")[0]
    other = next(letter for letter in "ABCD" if letter != wrong["answer"])
    assert not grade("mcq", f"so \\boxed{{{other}}}", answer=wrong["answer"]).correct


def test_training_mix_and_row_shapes() -> None:
    rows = synthetic.sft_rows(200, seed=0, mcq_fraction=0.5)
    kinds = {"mcq" if "Answer with the letter." in r["messages"][0]["content"] else "math" for r in rows}
    assert kinds == {"math", "mcq"}
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    assert [m["role"] for m in synthetic.rl_rows(3)[0]["messages"]] == ["user"]


def test_small_alphabet() -> None:
    text = "\n".join(synthetic.pretraining_corpus(500, seed=0))
    words = "Compute Answer with the letter. is \\boxed{} A) B) C) D)"
    assert set(text) <= set("0123456789 +-*()=.\n") | set(words)


def test_bad_config_and_exhausted_space() -> None:
    with pytest.raises(ValueError, match="min_steps"):
        synthetic.ArithmeticConfig(min_steps=3, max_steps=2)
    tiny = synthetic.ArithmeticConfig(min_steps=1, max_steps=1, min_operand=1, max_operand=2, ops="+")
    with pytest.raises(ValueError, match="distinct test problems"):
        synthetic.eval_records(50, config=tiny)
