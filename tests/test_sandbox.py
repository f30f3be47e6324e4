"""Sandboxed execution: limits, statuses, and containment of hostile Python and C++ programs.

Every containment case can fail: the secrets are planted where an unconfined program would
find them (the grader's environment, an open generations file, a host process's command
line), the outside targets are real host paths, and a listening socket waits on the host.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

from pipo.eval.graders import grade_code, grade_record
from pipo.eval.sandbox import (
    BUBBLEWRAP,
    UNSAFE,
    SandboxConfig,
    SandboxUnavailable,
    Status,
    _warn_unsafe,
    bubblewrap_problem,
    run_python,
    sandbox_mode,
)
from tests.fixtures_code import cf_tests, fenced, host_processes_with, wait_for

FAST = SandboxConfig(cpu_s=1, wall_s=2, memory_mb=512, output_bytes=64 * 1024)
PROJECT = Path(__file__).resolve().parents[1]
SECRET_PREFIX = "PIPO-SECRET-"
SANDBOX_ROOT = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "proc", "dev", "tmp", "sandbox"}


def test_bubblewrap_works_here():
    """CI installs bubblewrap; everything below must run sandboxed, not fall back."""
    assert bubblewrap_problem(SandboxConfig().python) is None
    assert sandbox_mode(SandboxConfig()) == BUBBLEWRAP


def test_runs_a_program_with_stdin_in_a_fresh_sandbox():
    source = ("import os\nprint(input()[::-1], os.getcwd(), os.getuid(), os.getpid())\n"
              "print(sorted(os.listdir('/')))\nprint(sorted(os.listdir('/proc/self/..')))")
    result = run_python(source, "abc\n", FAST)
    assert result.status is Status.OK and result.ok, result
    first, root, pids = result.stdout.splitlines()
    reversed_input, cwd, uid, pid = first.split()
    assert (reversed_input, cwd) == ("cba", "/sandbox")
    assert int(uid) != 0 and int(pid) < 10  # unprivileged, in its own PID namespace
    assert set(json.loads(root.replace("'", '"'))) <= SANDBOX_ROOT  # no /home, /root, /work, /etc
    assert len([p for p in json.loads(pids.replace("'", '"')) if p.isdigit()]) < 10  # no host processes


def test_files_go_in_and_one_comes_back_without_host_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    source = "data = open('data.txt').read()\nopen('out.txt', 'w').write(data.upper())"
    result = run_python(source, "", FAST, files={"data.txt": "hello"}, collect="out.txt")
    assert result.ok and result.collected == b"HELLO", result
    assert run_python("pass", "", FAST, collect="out.txt").collected is None
    assert list(tmp_path.iterdir()) == []  # nothing was written on the host


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("PIPO_PARENT_SECRET", "leak")
    result = run_python("import os; print(sorted(os.environ))", "", FAST)
    assert result.ok and "PIPO_PARENT_SECRET" not in result.stdout


@pytest.mark.parametrize(
    ("source", "status"),
    [
        ("raise SystemExit(3)", Status.RUNTIME_ERROR),
        ("1 / 0", Status.RUNTIME_ERROR),
        ("while True:\n    pass", Status.TIMEOUT),
        ("import time\ntime.sleep(60)", Status.TIMEOUT),
        ("x = bytearray(8 * 1024 ** 3)", Status.MEMORY),
        ("while True:\n    print('A' * 4096)", Status.OUTPUT_LIMIT),
    ],
)
def test_failure_statuses(source, status):
    result = run_python(source, "", FAST)
    assert result.status is status, result
    assert len(result.stdout.encode()) <= FAST.output_bytes


def test_stderr_is_kept_as_a_tail():
    result = run_python("import sys\nfor i in range(100000):\n    print(i, file=sys.stderr)\nraise KeyError('last')",
                        "", FAST)
    assert result.status is Status.RUNTIME_ERROR
    assert len(result.stderr.encode()) <= FAST.stderr_tail_bytes
    assert "KeyError: 'last'" in result.stderr


# --- containment ------------------------------------------------------------------------------

def _python_hostiles(targets: list[str], port: int, marker: str, host_pids: list[int]) -> dict[str, str]:
    """Each program tries one class of escape; attempts that raise are skipped so all get tried.
    Programs that survive print the question back (not the answer): a wrong answer."""
    attempt = "def attempt(f):\n    try:\n        return f()\n    except BaseException:\n        return None\n"
    programs = {
        "fork_bomb": """
            import os, subprocess, sys
            while True:
                attempt(os.fork)
                attempt(lambda: subprocess.Popen([sys.executable, "-c", "pass"]))
            """,
        "process_flood": f"""
            import os
            started = 0
            for _ in range(1000):
                if attempt(lambda: os.posix_spawn("/usr/bin/sleep", [{marker!r}, "60"], {{}})):
                    started += 1
            print(input(), started)
            """,
        "memory_bomb": """
            blocks = []
            while True:
                blocks.append(bytearray(64 * 1024 * 1024))
            """,
        "infinite_loop": "while True:\n    pass\n",
        "file_flood": """
            import os
            written = 0
            for folder in ("/sandbox", "/tmp", "/dev/shm", "/dev", "/"):
                for i in range(1000):
                    if attempt(lambda: open(f"{folder}/flood{i}", "wb").write(b"x" * (4 << 20))) is None:
                        break
                    written += 4
            print(input(), written)
            """,
        "output_flood": "while True:\n    print('flood' * 1000)\n",
        "write_outside": f"""
            import os, shutil
            for target in {targets!r}:
                attempt(lambda: open(os.path.join(target, "open.txt"), "w").write("x"))
                attempt(lambda: os.mkdir(os.path.join(target, "dir")))
                attempt(lambda: shutil.copy("/usr/bin/true", os.path.join(target, "copy")))
            print(input())
            """,
        "network": f"""
            import socket
            attempt(lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1))
            attempt(lambda: socket.create_connection(("10.0.0.1", 80), timeout=1))
            attempt(lambda: socket.getaddrinfo("pypi.org", 443))
            print(input())
            """,
        "read_secrets": f"""
            import os, re
            pattern = re.compile(r"{SECRET_PREFIX}[0-9a-f]{{32}}")
            found = []
            def scan(data):
                found.extend(pattern.findall(data if isinstance(data, str) else data.decode("latin-1")))
            def read(path):  # non-blocking: a reopened pipe (its own stdout) would never end
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    scan(os.read(fd, 1 << 24))
                finally:
                    os.close(fd)
            def walk(root):
                for d, _, files in os.walk(root):
                    for name in files:
                        attempt(lambda: read(os.path.join(d, name)))
            scan(repr(dict(os.environ)))
            for root in ["/sandbox", "/tmp", *{targets!r}]:
                walk(root)
            for pid in [*os.listdir("/proc"), *map(str, {host_pids!r})]:
                for name in ("cmdline", "environ"):
                    attempt(lambda: read(f"/proc/{{pid}}/{{name}}"))
                fds = f"/proc/{{pid}}/fd/"
                attempt(lambda: [attempt(lambda: read(fds + fd)) for fd in os.listdir(fds)])
            print(found[0] if found else "nothing found")
            """,
        "read_host_files": f"""
            import os
            paths = ["/etc/shadow", "/etc/passwd", "/root", "/home", {str(PROJECT)!r}, *{targets!r}]
            readable = [p for p in paths if attempt(lambda: os.listdir(p) if os.path.isdir(p) else open(p).read(1))
                        is not None]
            print(input(), readable)
            """,
        "signal_everyone": f"""
            import os, signal
            attempt(lambda: os.kill(-1, signal.SIGKILL))
            for pid in [*{host_pids!r}, *map(int, filter(str.isdigit, os.listdir("/proc")))]:
                if pid != os.getpid():
                    attempt(lambda: os.kill(pid, signal.SIGKILL))
            print(input())
            """,
        "escape_process_group": f"""
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execv("/usr/bin/sleep", [{marker!r}, "60"])
                os._exit(0)
            time.sleep(0.2)
            print(input())
            """,
    }
    return {name: attempt + textwrap.dedent(source) for name, source in programs.items()}


class _Planted:
    """Secrets and traps around one containment test: the expected output in the grader's
    environment, in an open generations file and in a host process's command line; a
    listening socket; outside folders; a host process the sandbox user could signal."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.expected = SECRET_PREFIX + secrets.token_hex(16)
        self.marker = "pipo-escapee-" + secrets.token_hex(8)
        monkeypatch.setenv("PIPO_EXPECTED", self.expected)
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        self.generations = (tmp_path / "generations.jsonl").open("w+")
        self.generations.write(json.dumps({"expected": self.expected}))
        self.generations.flush()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.server.setblocking(False)
        user = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
        # Same host uid as the sandbox: only the PID namespace keeps it from being signalled.
        self.bystander = subprocess.Popen(["/usr/bin/python3", "-c", "import time; time.sleep(120)",
                                           self.expected], **user)
        self.scratch = Path(tempfile.gettempdir()) / ("pipo-escape-" + secrets.token_hex(8))
        self.targets = [str(self.outside), str(PROJECT), "/root", str(self.scratch)]
        self.host_pids = [os.getpid(), os.getppid(), self.bystander.pid]

    def close(self) -> None:
        self.generations.close()
        self.server.close()
        self.bystander.kill()
        self.bystander.wait()

    def assert_untouched(self) -> None:
        assert list(self.outside.iterdir()) == []
        assert not self.scratch.exists()
        assert not any((Path(t) / name).exists() for t in self.targets for name in ("open.txt", "dir", "copy"))
        with pytest.raises(BlockingIOError):
            self.server.accept()  # no connection reached the listening socket
        assert self.bystander.poll() is None  # not killed from inside a sandbox
        assert host_processes_with(self.marker) == []  # nothing outlived its sandbox


@pytest.fixture
def planted(tmp_path, monkeypatch):
    traps = _Planted(tmp_path, monkeypatch)
    yield traps
    traps.close()


def _grade_all(completions: dict[str, str], given: str, expected: str, language: str) -> dict:
    tests = cf_tests([given + "\n"], [expected + "\n"], language=language, time_limit_s=1)
    record = {"id": "p1", "benchmark": "codeforces", "answer": None, "metadata": {}, "tests": tests,
              "completions": list(completions.values())}
    return dict(zip(completions, grade_record(record, sandbox=SandboxConfig(memory_mb=256, nproc=32))))


def test_hostile_python_programs_are_contained(planted):
    given = "question-" + secrets.token_hex(8)
    hostile = _python_hostiles(planted.targets, planted.server.getsockname()[1], planted.marker,
                               planted.host_pids)
    good = f"print({{{given!r}: {planted.expected!r}}}[input().strip()])"
    completions = {name: fenced(source) for name, source in hostile.items()} | {"good": fenced(good)}
    verdicts = _grade_all(completions, given, planted.expected, "python")
    assert verdicts.pop("good").correct  # the grader survived every hostile program before it
    for name, result in verdicts.items():
        assert not result.correct, (name, result)
    assert verdicts["fork_bomb"].verdicts == ("time_limit",)
    assert verdicts["memory_bomb"].verdicts == ("memory_limit",)
    assert verdicts["infinite_loop"].verdicts == ("time_limit",)
    assert verdicts["output_flood"].verdicts == ("output_limit",)
    for name in ("write_outside", "network", "read_secrets", "read_host_files", "signal_everyone",
                 "escape_process_group", "process_flood", "file_flood"):
        assert verdicts[name].reason == "wrong answer on test 1/1", (name, verdicts[name])
    planted.assert_untouched()


def _stdout(source: str, stdin: str = "question\n") -> str:
    result = run_python(textwrap.dedent(source), stdin, SandboxConfig(cpu_s=2, memory_mb=256, nproc=32))
    assert result.ok, result
    return result.stdout.strip()


def test_what_the_hostile_programs_saw(planted):
    """The wrong answers above are wrong for the right reason: the attempts all failed."""
    hostile = _python_hostiles(planted.targets, planted.server.getsockname()[1], planted.marker,
                               planted.host_pids)
    assert _stdout(hostile["read_secrets"]) == "nothing found"
    assert _stdout(hostile["read_host_files"]) == "question []"
    started = int(_stdout(hostile["process_flood"]).split()[1])
    assert 0 < started < 32  # RLIMIT_NPROC binds inside the sandbox
    assert int(_stdout(hostile["file_flood"]).split()[1]) <= 3 * SandboxConfig().tmpfs_mb  # tmpfs sizes bind
    planted.assert_untouched()


def test_the_secret_finder_finds_an_unconfined_secret(tmp_path):
    """Control: the same program, given the secret where it looks, does report it."""
    secret = SECRET_PREFIX + "0" * 32
    hostile = _python_hostiles([], 9, "unused", [])
    result = run_python(hostile["read_secrets"], "", FAST, files={"leak.txt": secret})
    assert result.stdout.strip() == secret


def test_a_sandbox_cannot_signal_a_concurrent_one(planted):
    hostile = _python_hostiles([], 9, planted.marker, planted.host_pids)["signal_everyone"]
    waiting = "pipo-patient-" + secrets.token_hex(8)
    patient = (f"import os\npid = os.fork()\nif pid == 0:\n    os.execv('/usr/bin/sleep', [{waiting!r}, '2'])\n"
               "os.waitpid(pid, 0)\nprint('alive')")
    results = {}
    config = SandboxConfig(cpu_s=1, wall_s=30)
    slow = threading.Thread(target=lambda: results.update(patient=run_python(patient, "", config)))
    slow.start()
    try:
        wait_for(lambda: bool(host_processes_with(waiting)), 30, "the patient sandbox to start")
        results["killer"] = run_python(hostile, "q\n", config)
        assert host_processes_with(waiting), "the other sandbox's process was killed"
    finally:
        slow.join()
    assert results["killer"].stdout.strip() == "q"
    assert results["patient"].ok and results["patient"].stdout.strip() == "alive", results["patient"]
    planted.assert_untouched()


def _cpp_hostiles(targets: list[str], port: int) -> dict[str, str]:
    echo = "char q[256]; if (scanf(\"%255s\", q) == 1) printf(\"%s\\n\", q);"
    paths = ", ".join(f'"{t}/open.txt"' for t in targets)
    return {
        "fork_bomb": "#include <unistd.h>\nint main(){ for(;;) fork(); }",
        "memory_bomb": ("#include <vector>\nint main(){ std::vector<std::vector<char>> v;"
                        " for(;;) v.emplace_back(1 << 26, 1); }"),
        "infinite_loop": "int main(){ volatile unsigned long x = 0; for(;;) x++; }",
        "output_flood": "#include <cstdio>\nint main(){ for(;;) puts(\"flood flood flood flood\"); }",
        "write_outside": ("#include <cstdio>\n#include <sys/stat.h>\nint main(){ const char* p[] = {" + paths + "};"
                          " for (const char* f : p) { FILE* h = fopen(f, \"w\");"
                          " if (h) { fputs(\"x\", h); fclose(h); } }"
                          + echo + " }"),
        "network": ("#include <cstdio>\n#include <sys/socket.h>\n#include <netinet/in.h>\n#include <arpa/inet.h>\n"
                    "int main(){ int s = socket(AF_INET, SOCK_STREAM, 0); sockaddr_in a{}; a.sin_family = AF_INET;"
                    f" a.sin_port = htons({port}); inet_pton(AF_INET, \"127.0.0.1\", &a.sin_addr);"
                    " connect(s, (sockaddr*)&a, sizeof a);" + echo + " }"),
        "kill_everyone": "#include <cstdio>\n#include <csignal>\nint main(){ kill(-1, SIGKILL);" + echo + " }",
    }


def test_hostile_cpp_programs_are_contained(planted):
    hostile = _cpp_hostiles(planted.targets, planted.server.getsockname()[1])
    completions = {name: fenced(source, "cpp") for name, source in hostile.items()}
    verdicts = _grade_all(completions, "question", planted.expected, "cpp")
    assert verdicts["fork_bomb"].verdicts == ("time_limit",), verdicts["fork_bomb"]
    assert verdicts["memory_bomb"].verdicts == ("memory_limit",), verdicts["memory_bomb"]
    assert verdicts["infinite_loop"].verdicts == ("time_limit",)
    assert verdicts["output_flood"].verdicts == ("output_limit",)
    for name in ("write_outside", "network", "kill_everyone"):
        assert verdicts[name].reason == "wrong answer on test 1/1", (name, verdicts[name])
    planted.assert_untouched()


def test_hostile_source_is_contained_at_compile_time():
    leak = fenced('#include "/etc/shadow"\nint main(){}', "cpp")
    result = grade_code(leak, cf_tests(["\n"], ["\n"], language="cpp"), FAST)
    assert result.verdicts == ("compile_error",) and "No such file" in result.reason, result


# --- no sandbox ---------------------------------------------------------------------------------

def test_without_bubblewrap_code_is_refused_unless_unsafe_is_asked_for(monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")  # bwrap cannot be found
    bubblewrap_problem.cache_clear()
    _warn_unsafe.cache_clear()  # the warning is logged once per process: an earlier test (pipo score) may have had it
    try:
        with pytest.raises(SandboxUnavailable, match="--unsafe-no-sandbox"):
            run_python("print(1)", "", FAST)
        unsafe = SandboxConfig(cpu_s=1, unsafe_no_sandbox=True)
        assert sandbox_mode(unsafe) == UNSAFE
        assert run_python("print(input())", "ran\n", unsafe).stdout == "ran\n"
        assert "WITHOUT A SANDBOX" in caplog.text
    finally:
        bubblewrap_problem.cache_clear()


# --- as an unprivileged user -------------------------------------------------------------------

_UNPRIVILEGED_DRIVER = """
import json, sys
from pipo.eval.sandbox import SandboxConfig, run_python, sandbox_mode
programs = json.load(sys.stdin)
config = SandboxConfig(cpu_s=1, memory_mb=256, nproc=32)
out = {"mode": sandbox_mode(config)}
for name, source in programs.items():
    result = run_python(source, "question\\n", config)
    out[name] = [result.status.value, result.stdout.strip()]
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the whole suite already runs unprivileged")
def test_containment_when_the_grader_itself_is_unprivileged(planted):
    """The grader run by an ordinary user (here `nobody`, with the system python): bwrap then
    creates the user namespace itself."""
    home = Path(tempfile.mkdtemp(prefix="pipo-unprivileged-"))
    try:
        for module in ("errors.py", "eval/sandbox.py"):
            (home / "pipo" / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(PROJECT / "pipo" / module, home / "pipo" / module)
        for package in ("pipo", "pipo/eval"):
            (home / package / "__init__.py").touch()
        for path in [home, *home.rglob("*")]:
            path.chmod(0o755)
        hostile = _python_hostiles(planted.targets, planted.server.getsockname()[1], planted.marker,
                                   planted.host_pids)
        names = ("read_secrets", "read_host_files", "signal_everyone", "escape_process_group", "write_outside",
                 "network", "process_flood", "fork_bomb")
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
             _UNPRIVILEGED_DRIVER], input=json.dumps({n: hostile[n] for n in names}), capture_output=True,
            text=True, cwd=home, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(home)}, timeout=120, check=False)
    finally:
        shutil.rmtree(home)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen.pop("mode") == BUBBLEWRAP
    assert seen.pop("fork_bomb")[0] == "timeout"
    assert seen.pop("read_secrets") == ["ok", "nothing found"]
    assert seen.pop("read_host_files") == ["ok", "question []"]
    assert 0 < int(seen.pop("process_flood")[1].split()[1]) < 32
    assert seen == {name: ["ok", "question"] for name in seen}, seen
    planted.assert_untouched()


def test_sandbox_does_not_depend_on_the_grader_interpreter():
    """Untrusted code runs with the system python under /usr; the grader's may be elsewhere."""
    result = run_python("import sys; print(sys.executable)", "", FAST)
    assert result.stdout.strip() == "/usr/bin/python3"
