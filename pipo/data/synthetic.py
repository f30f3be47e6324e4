"""The demo's synthetic task: seeded multi-step arithmetic with step-by-step solutions.

    question: "Compute ((17 + 5) * 3) - 8."
    solution: "17 + 5 = 22. 22 * 3 = 66. 66 - 8 = 58. \\boxed{58}"

The text uses a small alphabet (digits, operators, a few words), so a tiny tokenizer
and tiny models learn it on CPU in minutes. Every problem belongs to exactly one split,
decided by a hash of its expression, so no evaluation problem can ever show up in
training data, whatever the seeds or sizes asked for.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal

from pipo.data.problems import LETTERS, Record, make_record, shuffled_choices, stable_seed

Split = Literal["train", "test"]
Kind = Literal["math", "mcq"]

DEFAULT_TEST_SIZE = 100
MCQ_INSTRUCTION = "Answer with the letter."
MCQ_FRACTION = 0.25  # share of training problems shown as multiple choice


@dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty: number of steps and operand ranges; values stay in [0, max_value]."""

    min_steps: int = 2
    max_steps: int = 3
    min_operand: int = 1
    max_operand: int = 20
    max_multiplier: int = 9
    max_value: int = 999
    ops: str = "+-*"
    # share of the problem space reserved for evaluation; keep it equal for training and
    # evaluation data, since it decides which problems each split may use
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not 0 <= self.min_operand <= self.max_operand <= self.max_value:
            raise ValueError("need 0 <= min_operand <= max_operand <= max_value")
        if not set(self.ops) <= set("+-*") or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {self.ops!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class Step:
    """One operation `left op right` of a chain."""

    left: int
    op: str
    right: int

    @property
    def result(self) -> int:
        return apply(self.left, self.op, self.right)


@dataclass(frozen=True)
class Problem:
    """A chain of steps starting from `start`; each step works on the previous result."""

    start: int
    steps: tuple[Step, ...]

    @property
    def expression(self) -> str:
        """Left-to-right chain with explicit parentheses: ((a + b) * c) - d."""
        text = str(self.start)
        for i, step in enumerate(self.steps):
            text = f"({text})" if i > 0 else text
            text = f"{text} {step.op} {step.right}"
        return text

    @property
    def answer(self) -> int:
        return self.steps[-1].result

    @property
    def question(self) -> str:
        return f"Compute {self.expression}."

    @property
    def working(self) -> str:
        """The step-by-step lines, without the boxed answer."""
        return " ".join(f"{s.left} {s.op} {s.right} = {s.result}." for s in self.steps)

    @property
    def solution(self) -> str:
        return f"{self.working} \\boxed{{{self.answer}}}"

    @property
    def uid(self) -> str:
        return hashlib.sha256(self.expression.encode("utf-8")).hexdigest()[:12]


def apply(left: int, op: str, right: int) -> int:
    """The value of one step."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    raise ValueError(f"unknown operator {op!r}")


def split_of(problem: Problem, config: ArithmeticConfig) -> Split:
    """The split a problem belongs to, fixed by its expression alone."""
    bucket = stable_seed("synthetic-split", problem.expression) % 1_000_000
    return "test" if bucket < config.test_fraction * 1_000_000 else "train"


def _random_step(rng: random.Random, value: int, config: ArithmeticConfig) -> Step:
    """One step whose result stays within [0, max_value] (products use small multipliers)."""
    choices: list[Step] = []
    for op in config.ops:
        if op == "*":
            lo, hi = 2, min(config.max_multiplier, config.max_value // max(value, 1))
        elif op == "-":
            lo, hi = config.min_operand, min(config.max_operand, value)
        else:
            lo, hi = config.min_operand, min(config.max_operand, config.max_value - value)
        if lo <= hi:
            choices.append(Step(value, op, rng.randint(lo, hi)))
    if not choices:
        raise ValueError(f"no operator keeps {value} within [0, {config.max_value}] with config {config}")
    return rng.choice(choices)


def _random_problem(rng: random.Random, config: ArithmeticConfig) -> Problem:
    value = rng.randint(config.min_operand, config.max_operand)
    start, steps = value, []
    for _ in range(rng.randint(config.min_steps, config.max_steps)):
        steps.append(_random_step(rng, value, config))
        value = steps[-1].result
    return Problem(start, tuple(steps))


def problems(
    n: int, *, seed: int = 0, split: Split = "train", config: ArithmeticConfig | None = None
) -> list[Problem]:
    """`n` distinct problems of one split, reproducible from the seed."""
    config = config or ArithmeticConfig()
    rng = random.Random(stable_seed("synthetic-problems", split, seed))
    found: dict[str, Problem] = {}
    for _ in range(100 * n + 1000):
        if len(found) >= n:
            break
        problem = _random_problem(rng, config)
        if split_of(problem, config) == split:
            found.setdefault(problem.expression, problem)
    if len(found) < n:
        raise ValueError(
            f"only {len(found)} distinct {split} problems found for n={n}; widen the config {config}"
        )
    return list(found.values())


def distractors(problem: Problem, seed: int, count: int = 3) -> list[str]:
    """Plausible wrong answers: near misses, a wrong last operator, the skipped last step."""
    last, answer = problem.steps[-1], problem.answer
    candidates = [answer + d for d in (-10, -2, -1, 1, 2, 10)]
    candidates += [apply(last.left, op, last.right) for op in "+-*" if op != last.op]
    candidates.append(last.left)
    unique = sorted({c for c in candidates if c >= 0 and c != answer})
    random.Random(stable_seed("synthetic-distractors", seed, problem.uid)).shuffle(unique)
    return [str(c) for c in unique[:count]]


def math_record(problem: Problem, split: Split) -> Record:
    """A problem as a `synthetic_math` record (grader math)."""
    return make_record(
        id=f"synthetic_math/{problem.uid}",
        benchmark="synthetic_math",
        prompt=problem.question,
        grader="math",
        answer=str(problem.answer),
        metadata={"solution": problem.solution, "expression": problem.expression, "split": split},
    )


def mcq_record(problem: Problem, split: Split, seed: int) -> Record:
    """A problem as a 4-choice `synthetic_mcq` record, options shuffled per question."""
    qid = f"synthetic_mcq/{problem.uid}"
    choices, letter = shuffled_choices(str(problem.answer), distractors(problem, seed), seed, qid)
    options = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return make_record(
        id=qid,
        benchmark="synthetic_mcq",
        prompt=f"{problem.question}\n{options}\n{MCQ_INSTRUCTION}",
        grader="mcq",
        answer=letter,
        metadata={
            "choices": choices,
            "solution": f"{problem.working} {problem.answer} is {letter}. \\boxed{{{letter}}}",
            "expression": problem.expression,
            "split": split,
        },
    )


def _kind_of(problem: Problem, mcq_fraction: float) -> Kind:
    """Which format a training problem is shown in, stable per problem."""
    return "mcq" if stable_seed("synthetic-kind", problem.uid) % 1000 < mcq_fraction * 1000 else "math"


def records(
    n: int,
    *,
    seed: int = 0,
    split: Split = "train",
    kind: Kind | Literal["mixed"] = "mixed",
    mcq_fraction: float = MCQ_FRACTION,
    config: ArithmeticConfig | None = None,
) -> list[Record]:
    """`n` records of one split: all math, all mcq, or mixed (`mcq_fraction` of them mcq)."""
    out = []
    for problem in problems(n, seed=seed, split=split, config=config):
        chosen = _kind_of(problem, mcq_fraction) if kind == "mixed" else kind
        out.append(mcq_record(problem, split, seed) if chosen == "mcq" else math_record(problem, split))
    return out


def eval_records(
    n: int = DEFAULT_TEST_SIZE, *, seed: int = 0, kind: Kind = "math", config: ArithmeticConfig | None = None
) -> list[Record]:
    """The evaluation set (`synthetic_math` or `synthetic_mcq`), disjoint from all training data."""
    return records(n, seed=seed, split="test", kind=kind, config=config)


def train_records(
    n: int, *, seed: int = 0, mcq_fraction: float = MCQ_FRACTION, config: ArithmeticConfig | None = None
) -> list[Record]:
    """Training prompts in the record schema (the demo's stand-in for DAPO-Math prompts)."""
    return records(n, seed=seed, split="train", kind="mixed", mcq_fraction=mcq_fraction, config=config)


def _prompts_and_solutions(
    n: int, seed: int, mcq_fraction: float, config: ArithmeticConfig | None
) -> list[tuple[str, str]]:
    rows = train_records(n, seed=seed, mcq_fraction=mcq_fraction, config=config)
    return [(r["prompt"], r["metadata"]["solution"]) for r in rows]


def pretraining_corpus(
    n: int, *, seed: int = 0, mcq_fraction: float = MCQ_FRACTION, config: ArithmeticConfig | None = None
) -> list[str]:
    """Plain documents "prompt\\nsolution" for pretraining tiny models from scratch."""
    pairs = _prompts_and_solutions(n, seed, mcq_fraction, config)
    return [f"{prompt}\n{solution}" for prompt, solution in pairs]


def sft_rows(
    n: int, *, seed: int = 0, mcq_fraction: float = MCQ_FRACTION, config: ArithmeticConfig | None = None
) -> list[dict[str, Any]]:
    """Chat `messages` rows (user prompt, assistant solution) for SFT."""
    return [
        {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": solution}]}
        for prompt, solution in _prompts_and_solutions(n, seed, mcq_fraction, config)
    ]


def rl_rows(
    n: int, *, seed: int = 0, mcq_fraction: float = MCQ_FRACTION, config: ArithmeticConfig | None = None
) -> list[dict[str, Any]]:
    """Prompt-only chat rows for on-policy distillation."""
    return [
        {"messages": [{"role": "user", "content": prompt}]}
        for prompt, _ in _prompts_and_solutions(n, seed, mcq_fraction, config)
    ]
