"""Graders on known right and wrong answers."""
from __future__ import annotations

import json

import pytest

from tests.fixtures_code import (
    CPP_SOLUTIONS,
    FILE_CPP_RIGHT,
    FILE_RIGHT,
    FILE_STDOUT_ONLY,
    FILE_TESTS,
    SPLIT_CPP_RIGHT,
    SPLIT_RIGHT_OTHER_ANSWER,
    SPLIT_TESTS,
    SPLIT_WRONG,
    SUM_TESTS,
    fenced,
)
from pipo.eval.graders import (
    Verdict,
    answer_region,
    extract_boxed,
    extract_choice,
    extract_code,
    grade_code,
    grade_math,
    grade_mcq,
    grade_record,
    grader_for,
    json_output_matches,
    stdout_matches,
)
from pipo.eval.sandbox import SandboxConfig


# --- extraction -------------------------------------------------------------------------

def test_extract_boxed_matches_nested_braces_and_takes_the_last_box():
    assert extract_boxed(r"\boxed{1} then \boxed{\frac{a^{2}}{b_{1}}}") == r"\frac{a^{2}}{b_{1}}"
    assert extract_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert extract_boxed(r"\fbox{7}") == "7"
    assert extract_boxed("no box here") is None


def test_extract_boxed_skips_a_box_cut_off_by_truncation():
    assert extract_boxed(r"\boxed{12} ... final \boxed{\frac{1}{") == "12"


def test_answer_region_is_after_the_last_closed_think():
    assert answer_region(r"<think>\boxed{1}</think> so \boxed{2}") == r" so \boxed{2}"
    assert answer_region(r"<think> still thinking \boxed{3}") == r"<think> still thinking \boxed{3}"


def _long_chain_of_thought(final: str) -> str:
    """Thousands of characters of reasoning with decoy boxes and nested braces."""
    steps = [rf"Step {i}: try $\frac{{{i}}}{{{i + 1}}}$, maybe \boxed{{{i}}} (no: {{{{x}}}})."
             for i in range(300)]
    return "<think>" + "\n".join(steps) + "</think>\nAll checks pass. " + final


def test_boxed_extraction_from_a_long_chain_of_thought():
    text = _long_chain_of_thought(r"The answer is \boxed{\dfrac{3}{4}}.")
    assert len(text) > 10_000
    assert extract_boxed(answer_region(text)) == r"\dfrac{3}{4}"
    assert grade_math(text, "0.75").correct
    assert not grade_math(text, "299").correct  # a decoy inside the thinking


# --- math -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("completion", "reference"),
    [
        (r"\boxed{0.5}", "1/2"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{\dfrac12}", r"\frac{1}{2}"),
        (r"\boxed{ 1 / 2 }", "0.5"),
        (r"\boxed{x = 5}", "5"),
        (r"\boxed{5}", "x=5"),
        (r"\boxed{\sqrt{18}}", r"3\sqrt{2}"),
        (r"\boxed{70}", "70"),
        ("<think>hmm \\boxed{3}</think>The final answer is $\\boxed{42}$.", "42"),
        ("After simplifying, the final answer is 42.", "42"),
    ],
)
def test_math_equivalent_answers_are_correct(completion, reference):
    result = grade_math(completion, reference)
    assert result.correct, result


@pytest.mark.parametrize(
    ("completion", "reference"),
    [
        (r"\boxed{71}", "70"),
        (r"\boxed{0.51}", "1/2"),
        (r"<think>\boxed{42}</think> I am not sure.", "42"),
        ("", "42"),
    ],
)
def test_math_wrong_or_missing_answers_fail(completion, reference):
    result = grade_math(completion, reference)
    assert not result.correct
    assert result.reason


def test_math_verify_is_bounded_by_the_timeout():
    """A tower whose evaluation is one bigint power inside sympy (a signal handler could not stop it): the child
    checking it is killed at the deadline, and the next check runs in a new one."""
    result = grade_math(r"\boxed{9^{9^{9^{9}}}}", "2", timeout_s=0.5)
    assert not result.correct
    assert "timed out" in result.reason
    assert grade_math(r"\boxed{2}", "2", timeout_s=10).correct


# --- multiple choice --------------------------------------------------------------------

@pytest.mark.parametrize(
    ("completion", "letter"),
    [
        (r"\boxed{B}", "B"),
        (r"\boxed{(B)}", "B"),
        (r"\boxed{\text{B}}", "B"),
        (r"\boxed{\textbf{(B)} Paris}", "B"),
        (r"\boxed{B. Paris}", "B"),
        (r"\boxed{b}", "B"),
        (r"\boxed{A} wait, no: \boxed{C}", "C"),
        (r"<think>\boxed{A}</think> Answer: $\boxed{D}$", "D"),
        (r"\boxed{Because}", None),
        ("The answer is B.", None),
        (r"\boxed{}", None),
    ],
)
def test_extract_choice_edge_cases(completion, letter):
    assert extract_choice(completion) == letter


def test_grade_mcq():
    assert grade_mcq(r"\boxed{(c)}", "C").correct
    wrong = grade_mcq(r"\boxed{A}", "C")
    assert not wrong.correct and "expected C" in wrong.reason
    assert grade_mcq("I pick B", "B").reason == "no boxed option letter"


# --- code -------------------------------------------------------------------------------

def test_extract_code_takes_the_last_python_block_of_the_answer():
    text = ("<think>```python\nprint('draft')\n```</think>\n"
            "```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n```text\nnot code\n```")
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("no code") is None


def test_stdout_comparison_normalises_whitespace():
    assert stdout_matches("1  2\n3\n\n", "1 2\n3")
    assert stdout_matches("0.3333333\n", "0.33333333")
    assert not stdout_matches("1 2\n", "1\n2\n")
    assert not stdout_matches("yes", "YES")


def test_json_output_comparison():
    assert json_output_matches("[1, 2]\n", "[1,2]")
    assert json_output_matches("true", "true")
    assert not json_output_matches("1", "true")
    assert not json_output_matches("", "1")


FAST = SandboxConfig(cpu_s=2)
STDIN_TESTS = {"format": "stdin", "inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7\n"],
               "fn_name": None, "time_limit_s": 2, "memory_mb": None}


def _fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def test_code_stdin_right_and_wrong():
    good = grade_code(_fenced("a, b = map(int, input().split())\nprint(a + b)"), STDIN_TESTS, FAST)
    assert good.correct, good
    wrong = grade_code(_fenced("a, b = map(int, input().split())\nprint(a * b)"), STDIN_TESTS, FAST)
    assert not wrong.correct and wrong.reason == "wrong answer on test 1/2"
    crash = grade_code(_fenced("raise ValueError('boom')"), STDIN_TESTS, FAST)
    assert not crash.correct and "ValueError: boom" in crash.reason
    assert grade_code("no code", STDIN_TESTS, FAST).reason == "no python code block"


FUNCTIONAL_TESTS = {"format": "functional", "inputs": ["[2, 7, 11, 15]\n9", "[3, 3]\n6"],
                    "outputs": ["[0, 1]", "[0, 1]"], "fn_name": "twoSum",
                    "time_limit_s": 2, "memory_mb": None}


def test_code_functional_solution_class_and_top_level_function():
    method = """
class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        print("debug output is ignored")
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
"""
    assert grade_code(_fenced(method), FUNCTIONAL_TESTS, FAST).correct
    function = "def twoSum(nums, target):\n    return [0, 1]"
    assert grade_code(_fenced(function), FUNCTIONAL_TESTS, FAST).correct
    wrong = "def twoSum(nums, target):\n    return [1, 0]"
    assert not grade_code(_fenced(wrong), FUNCTIONAL_TESTS, FAST).correct
    missing = "def other(nums, target):\n    return [0, 1]"
    assert "NameError" in grade_code(_fenced(missing), FUNCTIONAL_TESTS, FAST).reason


def test_grader_registry_and_record_dispatch():
    assert grader_for("aime25") == "math"
    assert grader_for("gpqa_diamond") == "mcq"
    assert grader_for("codeforces") == "code"
    assert grader_for("my_bench", {"grader": "mcq"}) == "mcq"
    with pytest.raises(ValueError, match="no grader for benchmark 'unknown'"):
        grader_for("unknown")
    record = {"id": "1", "benchmark": "synthetic_math", "answer": "4", "metadata": {},
              "completions": [r"\boxed{4}", r"\boxed{5}"]}
    assert [r.correct for r in grade_record(record)] == [True, False]
    json.dumps([r.__dict__ for r in grade_record(record)])  # results are JSON-friendly


def test_extract_code_by_language():
    text = "```python\nprint(1)\n```\n```cpp\nint main(){}\n```"
    assert extract_code(text, "cpp") == "int main(){}\n"
    assert extract_code(text) == "print(1)\n"


# --- checkers, C++, file input (open-r1/codeforces) -------------------------------------

def test_checker_accepts_any_right_answer_and_rejects_a_wrong_one():
    right = grade_code(SPLIT_RIGHT_OTHER_ANSWER, SPLIT_TESTS, FAST)
    assert right.correct and right.verdicts == ("accepted",) * 3, right
    wrong = grade_code(SPLIT_WRONG, SPLIT_TESTS, FAST)
    assert not wrong.correct and wrong.reason == "wrong answer (checker) on test 1/3", wrong
    assert grade_code(SPLIT_CPP_RIGHT, {**SPLIT_TESTS, "language": "cpp"}, FAST).correct


def test_broken_checker_is_a_checker_error_not_a_wrong_answer():
    broken = {**SPLIT_TESTS, "checker": "print('maybe')"}
    result = grade_code(SPLIT_RIGHT_OTHER_ANSWER, broken, FAST)
    assert not result.correct and result.verdicts == ("checker_error",), result
    assert "not a score" in result.reason


@pytest.mark.parametrize("verdict", sorted(CPP_SOLUTIONS))
def test_cpp_verdicts(verdict):
    result = grade_code(fenced(CPP_SOLUTIONS[verdict], "cpp"), SUM_TESTS, FAST)
    assert result.correct == (verdict == "accepted"), result
    expected_last = {"accepted": "accepted", "wrong_answer": "wrong_answer", "time_limit": "time_limit",
                     "compile_error": "compile_error", "memory_limit": "memory_limit",
                     "runtime_error": "runtime_error"}[verdict]
    assert result.verdicts[-1] == expected_last, result
    if verdict == "wrong_answer":  # int overflow: right on test 1, wrong on test 2
        assert result.verdicts == ("accepted", "wrong_answer") and result.reason.endswith("test 2/2")
    if verdict == "compile_error":
        assert "undeclared" in result.reason and result.reason.startswith("compile error: ")
    assert all(v in {x.value for x in Verdict} for v in result.verdicts)


def test_file_input_problem():
    assert grade_code(FILE_RIGHT, FILE_TESTS, FAST).verdicts == ("accepted", "accepted")
    assert grade_code(FILE_CPP_RIGHT, {**FILE_TESTS, "language": "cpp"}, FAST).correct
    stdout_only = grade_code(FILE_STDOUT_ONLY, FILE_TESTS, FAST)
    assert not stdout_only.correct and stdout_only.reason == "wrong answer (output.txt not written) on test 1/2"
    bad = grade_code(FILE_RIGHT, {**FILE_TESTS, "input_file": "../input.txt"}, FAST)
    assert bad.reason.startswith("bad tests: file names")


def test_codeforces_records_from_the_hub_schema_grade_end_to_end(tmp_path):
    """Loader output (checker, C++, file input) is what the grader runs."""
    from pipo.data.sources import load_codeforces_prompts
    from tests import fixtures_hub as hub

    hub.write_codeforces_prompts(tmp_path / "cf")
    records = {r["id"]: r for r in load_codeforces_prompts(tmp_path / "cf", cache_dir=tmp_path / "cache")}
    sum_cpp = '#include <cstdio>\nint main(){int a,b; scanf("%d %d",&a,&b); printf("%d\\n", a+b);}'
    split_cpp = '#include <cstdio>\nint main(){int a,b; scanf("%d %d",&a,&b); printf("%d %d\\n", a+b-1, 1);}'
    file_py = "a, b = map(int, open('input.txt').read().split())\nopen('output.txt', 'w').write(f'{a + b}\\n')"
    cases = [("codeforces/1/A/cpp", fenced(sum_cpp, "cpp"), True),
             ("codeforces/2/B/cpp", fenced(split_cpp, "cpp"), True),  # another right split, by the checker
             ("codeforces/2/B/cpp", fenced(split_cpp.replace("a+b-1", "a+b"), "cpp"), False),
             ("codeforces/4/D/python", fenced(file_py), True),
             ("codeforces/1/A/python", fenced("print(0)"), False)]
    for pid, completion, correct in cases:
        result = grade_code(completion, records[pid]["tests"], FAST)
        assert result.correct == correct, (pid, result)
