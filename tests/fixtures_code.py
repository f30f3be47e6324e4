"""Code-grading fixtures in the shape of open-r1/codeforces problems (`tests` blocks as the
loaders write them): a checker-judged problem with many right answers, C++ solutions of
each verdict, and a problem that reads and writes files."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cf_tests(inputs: list[str], outputs: list[str], **extra: Any) -> dict[str, Any]:
    """A `tests` block like `pipo.data.problems.code_tests` writes."""
    block = {"format": "stdin", "inputs": inputs, "outputs": outputs, "fn_name": None,
             "time_limit_s": 1.0, "memory_limit_mb": 256, "language": "python", "checker": None,
             "input_mode": "stdio", "input_file": None, "output_file": None}
    return {**block, **extra}


def fenced(code: str, language: str = "python") -> str:
    return f"Here is my solution.\n```{language}\n{code.strip()}\n```\n"


# "Print two positive integers a, b with a + b = n": any split is right, so the expected
# output (one valid split) cannot be compared literally; the checker decides.
SPLIT_CHECKER = """
import sys
inp, correct, out = (open(p).read().split() for p in sys.argv[1:4])
n = int(inp[0])
try:
    a, b = map(int, out)
    ok = a > 0 and b > 0 and a + b == n
except ValueError:
    ok = False
print(1 if ok else 0)
"""
SPLIT_TESTS = cf_tests(["5\n", "2\n", "10\n"], ["1 4\n", "1 1\n", "3 7\n"], checker=SPLIT_CHECKER)
SPLIT_RIGHT_OTHER_ANSWER = fenced("n = int(input())\nprint(n - 1, 1)")  # never the expected text
SPLIT_WRONG = fenced("n = int(input())\nprint(n, 0)")
SPLIT_CPP_RIGHT = fenced('#include <cstdio>\nint main(){int n; scanf("%d",&n); printf("%d 1\\n", n-1);}', "cpp")

# a + b in C++: one solution per verdict.
SUM_TESTS = cf_tests(["1 2\n", "2000000000 2000000000\n"], ["3\n", "4000000000\n"], language="cpp")
CPP_SOLUTIONS = {
    "accepted": '#include <cstdio>\nint main(){long long a,b; scanf("%lld %lld",&a,&b); printf("%lld\\n",a+b);}',
    "wrong_answer": '#include <cstdio>\nint main(){int a,b; scanf("%d %d",&a,&b); printf("%d\\n",a+b);}',
    "time_limit": '#include <cstdio>\nint main(){volatile unsigned long x=0; for(;;) x++;}',
    "compile_error": '#include <cstdio>\nint main(){ printf("%d\\n", undeclared); }',
    "memory_limit": ('#include <cstdio>\n#include <vector>\nint main(){std::vector<std::vector<char>> v;'
                     ' for(;;) v.emplace_back(64 << 20, 1);}'),
    "runtime_error": '#include <cstdlib>\nint main(){ abort(); }',
}

# Reads input.txt and writes output.txt (Codeforces `input_mode` "file"); stdin is empty.
FILE_TESTS = cf_tests(["3\n1 2 3\n", "1\n7\n"], ["6\n", "7\n"], input_mode="file",
                         input_file="input.txt", output_file="output.txt")
FILE_RIGHT = fenced("nums = open('input.txt').read().split()[1:]\n"
                    "open('output.txt', 'w').write(str(sum(map(int, nums))) + '\\n')")
FILE_STDOUT_ONLY = fenced("import sys\nnums = open('input.txt').read().split()[1:]\nprint(sum(map(int, nums)))")
FILE_CPP_RIGHT = fenced('#include <cstdio>\nint main(){FILE*i=fopen("input.txt","r"),*o=fopen("output.txt","w");'
                        ' int n,x; long long s=0; fscanf(i,"%d",&n); while(n--){fscanf(i,"%d",&x); s+=x;}'
                        ' fprintf(o,"%lld\\n",s);}', "cpp")


def host_processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker`` (the host sees every namespace)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:  # exited meanwhile
            pass
    return found


def children_of(pid: int) -> list[int]:
    """Live direct children of ``pid``."""
    found = []
    for child in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(child))
    return found


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.02)
