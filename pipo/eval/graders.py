"""Graders: is one completion right? Math (math-verify), multiple choice, and code.

Every grader looks only at the final answer: the text after the last ``</think>``
when the model closed its thinking, else the whole completion (a truncated
thought may still have boxed an answer).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipo.data.problems import GRADERS
from pipo.errors import PIPOError
from pipo.eval.sandbox import SandboxConfig, Status, die_with_parent, run_program, run_python


# Which grader a benchmark uses unless its record says otherwise (metadata["grader"]).
BENCHMARK_GRADERS: dict[str, str] = {
    "aime25": "math",
    "dapo_math": "math",
    "synthetic_math": "math",
    "gpqa_diamond": "mcq",
    "longbench_v2": "mcq",
    "synthetic_mcq": "mcq",
    "livecodebench": "code",
    "codeforces": "code",
}

DEFAULT_MATH_TIMEOUT_S = 10.0
DEFAULT_CODE_TIME_LIMIT_S = 6.0  # LiveCodeBench's per-test limit
CHECKER_TIME_LIMIT_S = 10.0
CPP_COMPILE_LIMITS = {"cpu_s": 30.0, "wall_s": 60.0, "memory_mb": 2048, "output_bytes": 64 << 20,
                      "file_bytes": 64 << 20, "tmpfs_mb": 256}
_FALLBACK_TAIL_CHARS = 2000  # no box: look for an answer near the end only


@dataclass(frozen=True)
class GradeResult:
    """One completion's verdict; ``reason`` is short and human readable."""

    correct: bool
    reason: str
    extracted: str | None = None
    verdicts: tuple[str, ...] = ()  # code: one Verdict value per test run


def grader_for(benchmark: str, metadata: Mapping[str, Any] | None = None) -> str:
    """The grader name for a record: ``metadata["grader"]`` wins, else the registry."""
    name = (metadata or {}).get("grader") or BENCHMARK_GRADERS.get(benchmark)
    if name not in GRADERS:
        raise ValueError(
            f"no grader for benchmark {benchmark!r} (grader {name!r}); set metadata.grader to "
            f"one of {GRADERS} or use a known benchmark: {sorted(BENCHMARK_GRADERS)}"
        )
    return name


# ---------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------

def answer_region(text: str) -> str:
    """The final answer part: after the last ``</think>`` if thinking was closed."""
    _, sep, after = text.rpartition("</think>")
    return after if sep else text


def _matching_brace(text: str, open_at: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_at``; escaped braces are skipped."""
    depth, i = 0, open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox``), braces matched.

    A box left unclosed by truncation is skipped in favour of the previous one.
    """
    for match in reversed(list(_BOX_RE.finditer(text))):
        end = _matching_brace(text, match.end() - 1)
        if end is not None:
            return text[match.end(): end].strip()
    return None


_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_FENCE_TAGS = {"python": ("python", "py", "python3"), "cpp": ("cpp", "c++", "cc", "cxx")}


def extract_code(text: str, language: str = "python") -> str | None:
    """The last fenced block of the answer in ``language`` (``python`` or ``cpp``), or the
    last untagged block if none is tagged."""
    blocks = _FENCE_RE.findall(answer_region(text))
    tagged = [body for tag, body in blocks if tag.lower() in _FENCE_TAGS[language]]
    untagged = [body for tag, body in blocks if not tag]
    chosen = tagged or untagged
    return chosen[-1] if chosen else None


_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+\s*")  # \text, \textbf, \mathrm, ...
_LETTER_RE = re.compile(
    r"^(?:(?:option|answer|choice)\s*:?\s*)?[(\[]?([A-Za-z])[)\]]?(?:$|[\s.:,)\]-])",
    re.IGNORECASE,
)


def extract_choice(text: str) -> str | None:
    """The upper-case option letter inside the last box, or None.

    Accepts ``B``, ``(B)``, ``\\text{B}``, ``B. text``, ``b``; rejects words like ``Because``.
    """
    boxed = extract_boxed(answer_region(text))
    if boxed is None:
        return None
    cleaned = _LATEX_COMMAND_RE.sub("", boxed).replace("{", "").replace("}", "")
    match = _LETTER_RE.match(cleaned.strip().strip("$").strip())
    return match.group(1).upper() if match else None


# ---------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------

class _DropTimeoutWarning(logging.Filter):
    """math-verify warns that its own timeout is off; the child's deadline (`_MathChild`) replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutWarning())


def _parse_boxed(latex: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse("\\boxed{" + latex + "}", extraction_config=configs, parsing_timeout=None)


def _parse_free_text(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=None)


def _verify(reference: str, boxed: str | None, region: str) -> tuple:
    """The math check itself: ("ok", correct, shown answer), or why there is none ("reference" / "answer")."""
    from math_verify import verify

    gold = _parse_boxed(reference)
    if not gold:
        return ("reference",)
    pred = _parse_boxed(boxed) if boxed is not None else _parse_free_text(region[-_FALLBACK_TAIL_CHARS:])
    if not pred:
        return ("answer",)
    return ("ok", bool(verify(gold, pred, timeout_seconds=None)), boxed if boxed is not None else str(pred[-1]))


def _serve_math(parent_pid: int) -> None:
    """The child's loop: JSON lines of `_verify` arguments on stdin, of its results on the protocol's fd
    (stdout itself then goes to stderr, so nothing a library prints can break the protocol)."""
    die_with_parent(parent_pid)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    _verify("1", "1", "")  # the imports (sympy) and parsers a first check builds, before any deadline runs
    replies.write(json.dumps(["ready"]) + "\n")
    for line in sys.stdin:
        try:
            result = _verify(*json.loads(line))
        except Exception as error:  # a parser bug on odd input is one failed grade, not a dead child
            result = ("error", f"{type(error).__name__}: {error}")
        replies.write(json.dumps(result) + "\n")


class _MathChild:
    """math-verify in a child process, killed (and started again on the next check) when a check passes its
    deadline. A SIGALRM in this process could not bound it: Python runs a signal handler between bytecodes,
    and sympy evaluates an answer like 9^{9^{9^9}} in one bigint power, which held the grader for hours.
    A plain subprocess, not multiprocessing: spawning re-runs the parent's main script, a Snakemake script
    that has no main guard."""

    START_TIMEOUT_S = 120.0  # a fresh child's imports and first check, on a loaded machine

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None

    def check(self, request: tuple, timeout_s: float | None) -> tuple | None:
        """`_verify(*request)` in the child; None when it ran past `timeout_s` (the child is then killed)."""
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self._start()
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            reply = self._reply(timeout_s)
            if reply is None:
                self._stop()
            return reply

    def _start(self) -> None:
        code = f"from pipo.eval.graders import _serve_math; _serve_math({os.getpid()})"
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, bufsize=1)
        if self._reply(self.START_TIMEOUT_S) is None:
            self._stop()
            raise PIPOError(f"the math-verify child did not start within {self.START_TIMEOUT_S:g} s")

    def _reply(self, timeout_s: float | None) -> tuple | None:
        """The child's next line, or None when none came within `timeout_s` or the child died."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        line = self.process.stdout.readline() if ready else ""
        return tuple(json.loads(line)) if line else None

    def _stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()
        self.process = None


_MATH = _MathChild()


def grade_math(completion: str, reference: str, timeout_s: float = DEFAULT_MATH_TIMEOUT_S) -> GradeResult:
    """Answer equivalence with math-verify (``1/2 == 0.5 == \\frac{1}{2}``, ``x=5 == 5``).

    The last box of the answer is compared; without a box, math-verify's own extraction
    runs on the end of the answer. The whole check is bounded by ``timeout_s`` (`_MathChild`).
    """
    region = answer_region(completion)
    boxed = extract_boxed(region)
    result = _MATH.check((reference, boxed, region), timeout_s)
    if result is None:
        return GradeResult(False, f"math-verify timed out after {timeout_s:g}s", boxed)
    if result[0] == "reference":
        return GradeResult(False, f"reference {reference!r} does not parse")
    if result[0] == "answer":
        return GradeResult(False, "no answer found", boxed)
    if result[0] == "error":
        return GradeResult(False, f"math-verify failed: {result[1]}", boxed)
    _, correct, shown = result
    suffix = "" if boxed is not None else " (no box; fallback extraction)"
    return GradeResult(correct, ("correct" if correct else "wrong answer") + suffix, shown)


# ---------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------

def grade_mcq(completion: str, answer: str) -> GradeResult:
    """The boxed option letter equals the reference letter; no box is a failure."""
    letter = extract_choice(completion)
    if letter is None:
        return GradeResult(False, "no boxed option letter")
    correct = letter == answer.strip().upper()
    return GradeResult(correct, "correct" if correct else f"chose {letter}, expected {answer}", letter)


# ---------------------------------------------------------------------------------------
# Code
# ---------------------------------------------------------------------------------------

# LiveCodeBench's grader prepends these imports; solutions rely on them (e.g. `List`).
_IMPORT_HEADER = """\
from string import *
from re import *
from datetime import *
from collections import *
from heapq import *
from bisect import *
from copy import *
from math import *
from random import *
from statistics import *
from itertools import *
from functools import *
from operator import *
from io import *
from sys import *
from json import *
from builtins import *
from typing import *
import string, re, datetime, collections, heapq, bisect, copy, math, random
import statistics, itertools, functools, operator, io, sys, json
sys.setrecursionlimit(50000)
"""

# Calls `fn_name` on newline-separated JSON arguments read from stdin and prints the
# JSON result; the solution's own prints are discarded so they cannot corrupt it.
_FUNCTIONAL_DRIVER = """
import io as _io_mod, json as _json_mod, sys as _sys_mod
_args = [_json_mod.loads(_line) for _line in _sys_mod.stdin.read().split("\\n") if _line.strip()]
_sys_mod.stdout = _io_mod.StringIO()
_ns = {"__name__": "solution"}
exec(_IMPORT_HEADER, _ns)
exec(compile(_SOLUTION, "solution.py", "exec"), _ns)
if isinstance(_ns.get("Solution"), type) and hasattr(_ns["Solution"], _FN_NAME):
    _fn = getattr(_ns["Solution"](), _FN_NAME)
elif callable(_ns.get(_FN_NAME)):
    _fn = _ns[_FN_NAME]
else:
    raise NameError("no function or Solution method named " + repr(_FN_NAME))
_result = _fn(*_args)
_sys_mod.stdout = _sys_mod.__stdout__
print(_json_mod.dumps(_result))
"""


def _stdin_program(code: str) -> str:
    return _IMPORT_HEADER + code


def _functional_program(code: str, fn_name: str) -> str:
    return (f"_IMPORT_HEADER = {_IMPORT_HEADER!r}\n_SOLUTION = {code!r}\n"
            f"_FN_NAME = {fn_name!r}\n{_FUNCTIONAL_DRIVER}")


def _tokens_equal(got: str, want: str) -> bool:
    if got == want:
        return True
    try:
        return math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=1e-6)
    except ValueError:
        return False


def stdout_matches(got: str, want: str) -> bool:
    """Line-by-line comparison with whitespace normalised (runs of blanks, blank
    lines) and numeric tokens compared with a 1e-6 tolerance."""
    def lines(text: str) -> list[list[str]]:
        return [row for row in (line.split() for line in text.splitlines()) if row]
    got_lines, want_lines = lines(got), lines(want)
    return len(got_lines) == len(want_lines) and all(
        len(g) == len(w) and all(_tokens_equal(a, b) for a, b in zip(g, w))
        for g, w in zip(got_lines, want_lines)
    )


def _json_equal(got: Any, want: Any) -> bool:
    if isinstance(got, float) or isinstance(want, float):
        return (isinstance(got, (int, float)) and isinstance(want, (int, float))
                and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6))
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(_json_equal(a, b) for a, b in zip(got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_json_equal(got[k], want[k]) for k in got)
    return type(got) is type(want) and got == want


def json_output_matches(got: str, want: str) -> bool:
    """The functional harness's JSON result equals the expected JSON value."""
    try:
        expected = json.loads(want)
        lines = got.strip().splitlines()
        return bool(lines) and _json_equal(json.loads(lines[-1]), expected)
    except json.JSONDecodeError:
        return False


class Verdict(str, enum.Enum):
    """Per-test outcome, as judges report it."""

    ACCEPTED = "accepted"
    WRONG_ANSWER = "wrong_answer"
    TIME_LIMIT = "time_limit"
    MEMORY_LIMIT = "memory_limit"
    RUNTIME_ERROR = "runtime_error"
    OUTPUT_LIMIT = "output_limit"
    COMPILE_ERROR = "compile_error"
    CHECKER_ERROR = "checker_error"


_STATUS_VERDICTS = {
    Status.TIMEOUT: (Verdict.TIME_LIMIT, "time limit exceeded"),
    Status.MEMORY: (Verdict.MEMORY_LIMIT, "memory limit exceeded"),
    Status.OUTPUT_LIMIT: (Verdict.OUTPUT_LIMIT, "output limit exceeded"),
    Status.KILLED: (Verdict.RUNTIME_ERROR, "killed by a signal"),
}

CHECKER_FILES = ("input.txt", "correct_output.txt", "solution_output.txt")


@dataclass(frozen=True)
class _Program:
    """What runs per test: a command and the files it needs in its working directory."""

    argv: tuple[str, ...]
    files: Mapping[str, str | bytes]


def _failure(status: Status, stderr: str) -> tuple[Verdict, str]:
    if status is Status.RUNTIME_ERROR:
        last = stderr.strip().splitlines()[-1:] or ["nonzero exit"]
        return Verdict.RUNTIME_ERROR, "runtime error: " + last[0][:200]
    return _STATUS_VERDICTS[status]


def _sandbox_for(tests: Mapping[str, Any], base: SandboxConfig, language: str) -> SandboxConfig:
    """Per-problem limits. For Python, memory is never set below ``base``: RLIMIT_AS counts
    virtual memory, far above the resident size that judges measure; for C++ the address
    space is close to it, so the problem's limit applies as given."""
    cpu = tests.get("time_limit_s") or DEFAULT_CODE_TIME_LIMIT_S
    # `memory_mb` is the key of generation files written before `memory_limit_mb`.
    problem_mb = int(tests.get("memory_limit_mb") or tests.get("memory_mb") or 0)
    memory = (problem_mb or base.memory_mb) if language == "cpp" else max(problem_mb, base.memory_mb)
    return dataclasses.replace(base, cpu_s=float(cpu), wall_s=None, memory_mb=memory)


def compile_cpp(source: str, sandbox: SandboxConfig | None = None) -> tuple[bytes | None, str]:
    """Compile with ``g++ -O2 -std=c++17`` inside the sandbox (a hostile source is contained
    like a hostile program). Returns the executable, or None and the first error line."""
    config = dataclasses.replace(sandbox or SandboxConfig(), **CPP_COMPILE_LIMITS)
    run = run_program(["g++", "-O2", "-std=c++17", "-o", "main", "main.cpp"], "", config,
                      files={"main.cpp": source}, collect="main")
    if run.ok and run.collected:
        return run.collected, ""
    if run.status is not Status.RUNTIME_ERROR:
        return None, "compiler " + _failure(run.status, run.stderr)[1]
    lines = run.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line] or lines[-1:] or ["nonzero exit"]
    return None, errors[0][:200]


def _check_with_checker(checker: str, given: str, want: str, got: str,
                        config: SandboxConfig) -> tuple[Verdict, str]:
    """Run the problem's checker (``python checker.py input.txt correct_output.txt
    solution_output.txt``, open-r1/codeforces) in its own sandbox with its own time limit.
    It prints a score; full marks (>= 1) is accepted (Codeforces checkers are all or nothing,
    on a 0-1 or 0-100 scale)."""
    run = run_python(checker, "", config, files=dict(zip(CHECKER_FILES, (given, want, got))),
                     args=CHECKER_FILES)
    if not run.ok:
        return Verdict.CHECKER_ERROR, f"checker failed ({_failure(run.status, run.stderr)[1]})"
    try:
        score = float(run.stdout.split()[0])
    except (IndexError, ValueError):
        return Verdict.CHECKER_ERROR, f"checker printed {run.stdout.strip()[:80]!r}, not a score"
    return (Verdict.ACCEPTED, "") if score >= 1 else (Verdict.WRONG_ANSWER, "wrong answer (checker)")


def _judge_test(program: _Program, given: str, want: str, tests: Mapping[str, Any], config: SandboxConfig,
                checker_config: SandboxConfig, matches: Callable[[str, str], bool]) -> tuple[Verdict, str]:
    """Run one test in a fresh sandbox and judge its output (outside the program's sandbox)."""
    files, stdin, collect = dict(program.files), given, None
    if tests.get("input_mode") == "file":
        files[tests["input_file"]], stdin, collect = given, "", tests["output_file"]
    run = run_program(program.argv, stdin, config, files=files, collect=collect)
    if not run.ok:
        return _failure(run.status, run.stderr)
    if collect is not None and run.collected is None:
        return Verdict.WRONG_ANSWER, f"wrong answer ({collect} not written)"
    got = run.stdout if collect is None else run.collected.decode("utf-8", errors="replace")
    if tests.get("checker"):
        return _check_with_checker(tests["checker"], given, want, got, checker_config)
    return (Verdict.ACCEPTED, "") if matches(got, want) else (Verdict.WRONG_ANSWER, "wrong answer")


def _tests_problem(tests: Mapping[str, Any], language: str) -> str | None:
    """Why ``tests`` cannot be run (None: they can)."""
    inputs, outputs = tests.get("inputs") or [], tests.get("outputs") or []
    if not inputs or len(inputs) != len(outputs):
        return f"bad tests: {len(inputs)} inputs, {len(outputs)} outputs"
    if language not in _FENCE_TAGS:
        return f"unsupported language {language!r}"
    if tests.get("input_mode", "stdio") not in ("stdio", "file"):
        return f"unsupported input mode {tests.get('input_mode')!r}"
    if tests.get("input_mode") == "file":
        names = (tests.get("input_file"), tests.get("output_file"))
        if not all(isinstance(n, str) and n and "/" not in n and n not in ("main", "main.py", ".", "..")
                   for n in names):
            return f"bad tests: file names {names!r}"
    if tests.get("format") == "functional" and (language != "python" or not tests.get("fn_name")):
        return "functional tests need python and fn_name"
    if tests.get("format") not in ("stdin", "functional"):
        return f"unsupported tests format {tests.get('format')!r}"
    return None


def grade_code(completion: str, tests: Mapping[str, Any], sandbox: SandboxConfig | None = None) -> GradeResult:
    """Run the last fenced block in the problem's language on every test, stopping at the
    first failure; ``verdicts`` holds one :class:`Verdict` per test run.

    ``tests``: ``format`` ``"stdin"`` (compare stdout) or ``"functional"`` (call ``fn_name``
    with JSON arguments, compare JSON); ``language`` ``python`` (default) or ``cpp``
    (compiled once); ``checker`` (judges outputs when several are right); ``input_mode``
    ``"file"`` with ``input_file`` / ``output_file`` instead of stdin/stdout.
    """
    language = tests.get("language") or "python"
    problem = _tests_problem(tests, language)
    if problem is not None:
        return GradeResult(False, problem)
    code = extract_code(completion, language)
    if code is None:
        return GradeResult(False, f"no {language} code block")
    base = sandbox or SandboxConfig()
    if language == "cpp":
        binary, error = compile_cpp(code, base)
        if binary is None:
            return GradeResult(False, "compile error: " + error, code, (Verdict.COMPILE_ERROR.value,))
        program = _Program(("./main",), {"main": binary})
    elif tests["format"] == "functional":
        program = _Program((base.python, "-I", "main.py"),
                           {"main.py": _functional_program(code, str(tests["fn_name"]))})
    else:
        program = _Program((base.python, "-I", "main.py"), {"main.py": _stdin_program(code)})
    matches = json_output_matches if tests["format"] == "functional" else stdout_matches
    config = _sandbox_for(tests, base, language)
    checker_config = dataclasses.replace(base, cpu_s=CHECKER_TIME_LIMIT_S, wall_s=None)
    inputs, outputs, verdicts = list(tests["inputs"]), list(tests["outputs"]), []
    for i, (given, want) in enumerate(zip(inputs, outputs), start=1):
        verdict, detail = _judge_test(program, str(given), str(want), tests, config, checker_config, matches)
        verdicts.append(verdict.value)
        if verdict is not Verdict.ACCEPTED:
            return GradeResult(False, f"{detail} on test {i}/{len(inputs)}", code, tuple(verdicts))
    return GradeResult(True, f"passed {len(inputs)} tests", code, tuple(verdicts))


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------

def grade(grader: str, completion: str, *, answer: str | None = None,
          tests: Mapping[str, Any] | None = None, sandbox: SandboxConfig | None = None,
          math_timeout_s: float = DEFAULT_MATH_TIMEOUT_S) -> GradeResult:
    """Grade one completion with the named grader."""
    if grader == "math":
        if answer is None:
            raise ValueError("math grading needs a reference answer")
        return grade_math(completion, answer, math_timeout_s)
    if grader == "mcq":
        if answer is None:
            raise ValueError("multiple-choice grading needs a reference letter")
        return grade_mcq(completion, answer)
    if grader == "code":
        if tests is None:
            raise ValueError("code grading needs tests")
        return grade_code(completion, tests, sandbox)
    raise ValueError(f"unknown grader {grader!r}; expected one of {GRADERS}")


def grade_record(record: Mapping[str, Any], completions: Sequence[str] | None = None,
                 sandbox: SandboxConfig | None = None,
                 math_timeout_s: float = DEFAULT_MATH_TIMEOUT_S) -> list[GradeResult]:
    """Grade every completion of a generation record (or the given ``completions``)."""
    grader = grader_for(record.get("benchmark", ""), record.get("metadata"))
    texts = record["completions"] if completions is None else completions
    return [grade(grader, text, answer=record.get("answer"), tests=record.get("tests"),
                  sandbox=sandbox, math_timeout_s=math_timeout_s) for text in texts]
