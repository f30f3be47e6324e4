"""Run untrusted programs (model-written Python and C++, problem checkers) in a bubblewrap sandbox.

Every run gets its own sandbox (``bwrap``) with new user, PID, network, IPC, mount, UTS
and cgroup namespaces:

- an unprivileged uid: as root the grader drops to ``nobody`` *before* starting bwrap, so
  the sandbox's user namespace maps to an unprivileged host uid (``RLIMIT_NPROC`` binds,
  file permissions apply); as any other user, bwrap maps to that user;
- a read-only view of ``/usr`` only (interpreter and toolchain: ``/usr/bin/python3``,
  ``g++``); no home, no project, no results, no host ``/proc`` (a fresh one for the new PID
  namespace), a minimal ``/dev``, an empty network namespace (loopback only);
- private size-capped tmpfs for ``/tmp`` and the working directory ``/sandbox``; the
  program and its input files are copied in from memory (``memfd``), so the grader writes no
  files and leaves no folder behind; a file the program writes (``collect``) comes back
  through an inherited pipe;
- ``--die-with-parent`` plus ``PR_SET_PDEATHSIG``: the sandbox dies with the grader;
- rlimits (CPU, address space, file size, processes, open files, no core dumps), output
  caps, and a wall-clock kill of the namespace's init, which takes every process in the
  namespace with it (a double fork + ``setsid`` cannot escape); the run returns only once
  the namespace is empty.

Expected outputs never enter the program's sandbox: the program gets its source, its input
and nothing else; outputs are compared by the caller.

Without a working bubblewrap nothing runs (:class:`SandboxUnavailable`) unless the config
says ``unsafe_no_sandbox``; then programs run directly under the rlimits alone, with a loud
warning, and :func:`sandbox_mode` reports it so metrics can record it.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import functools
import json
import logging
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pipo.errors import PIPOError

log = logging.getLogger(__name__)

SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY_UID = 65534
NOBODY_GID = 65534
SANDBOX_DIR = "/sandbox"
BUBBLEWRAP = "bubblewrap"
UNSAFE = "none (--unsafe-no-sandbox)"
_PATH = "/usr/bin:/bin"
# Root-level links or folders that make /usr usable (merged-/usr systems have links).
_USR_ALIASES = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class SandboxUnavailable(PIPOError):
    """bubblewrap cannot isolate programs here and unsafe execution was not asked for."""


class Status(str, enum.Enum):
    """How a sandboxed run ended."""

    OK = "ok"
    RUNTIME_ERROR = "runtime_error"
    TIMEOUT = "timeout"
    MEMORY = "memory"
    OUTPUT_LIMIT = "output_limit"
    KILLED = "killed"


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one run. ``wall_s`` defaults to ``2 * cpu_s + 1`` (sleeping programs).

    ``python`` must live under ``/usr``, the only host folder the sandbox sees (the grader's
    own interpreter may sit in a venv under a home folder that must stay hidden).
    ``unsafe_no_sandbox`` allows running without isolation when bubblewrap does not work.
    """

    cpu_s: float = 6.0
    wall_s: float | None = None
    memory_mb: int = 1024
    output_bytes: int = 1 << 20
    stderr_tail_bytes: int = 4096
    file_bytes: int = 16 << 20
    tmpfs_mb: int = 64
    nproc: int = 64
    nofile: int = 64
    python: str = SYSTEM_PYTHON
    unsafe_no_sandbox: bool = False

    @property
    def wall_limit_s(self) -> float:
        return self.wall_s if self.wall_s is not None else 2 * self.cpu_s + 1


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run; ``stdout`` and ``collected`` are capped at ``output_bytes``.

    ``collected`` is the content of the file named by ``collect`` (None if not written).
    """

    status: Status
    stdout: str
    stderr: str
    wall_s: float
    returncode: int
    collected: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


def run_python(source: str, stdin: str = "", config: SandboxConfig | None = None, *,
               files: Mapping[str, str | bytes] | None = None, args: Sequence[str] = (),
               collect: str | None = None) -> SandboxResult:
    """Run ``source`` as ``main.py`` with ``args``, feeding ``stdin`` through a pipe."""
    config = config or SandboxConfig()
    return run_program([config.python, "-I", "main.py", *args], stdin, config,
                       files={**(files or {}), "main.py": source}, collect=collect)


def run_program(argv: Sequence[str], stdin: str = "", config: SandboxConfig | None = None, *,
                files: Mapping[str, str | bytes] | None = None,
                collect: str | None = None) -> SandboxResult:
    """Run ``argv`` in a fresh sandbox whose working directory holds ``files`` (name ->
    content, made executable), and return the file ``collect`` if the run wrote it."""
    config = config or SandboxConfig()
    for name in [*(files or {}), *([collect] if collect else [])]:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"sandbox file names must be plain names, got {name!r}")
    contents = {name: data.encode("utf-8") if isinstance(data, str) else data
                for name, data in (files or {}).items()}
    if sandbox_mode(config) == BUBBLEWRAP:
        return _run_bubblewrap(list(argv), stdin.encode("utf-8"), config, contents, collect)
    return _run_unsafe(list(argv), stdin.encode("utf-8"), config, contents, collect)


def sandbox_mode(config: SandboxConfig) -> str:
    """``"bubblewrap"`` when the sandbox works, :data:`UNSAFE` when it does not and the
    config allows running anyway; otherwise raise :class:`SandboxUnavailable`."""
    problem = bubblewrap_problem(config.python)
    if problem is None:
        return BUBBLEWRAP
    if config.unsafe_no_sandbox:
        _warn_unsafe(problem)
        return UNSAFE
    raise SandboxUnavailable(
        f"cannot sandbox model-written code: {problem}. Install bubblewrap (Debian: apt-get install "
        f"bubblewrap) and allow unprivileged user namespaces, or pass --unsafe-no-sandbox to run "
        f"untrusted code without isolation")


@functools.lru_cache(maxsize=None)
def _warn_unsafe(problem: str) -> None:
    log.warning("RUNNING MODEL-WRITTEN CODE WITHOUT A SANDBOX (--unsafe-no-sandbox): %s. It can read "
                "and write your files, see the expected outputs and reach the network.", problem)


@functools.lru_cache(maxsize=None)
def bubblewrap_problem(python: str) -> str | None:
    """Why bubblewrap cannot run ``python`` isolated here (None: it can). Probed once per
    process with a real run: bwrap may be missing, user namespaces refused, ``python``
    outside ``/usr`` or absent."""
    if shutil.which("bwrap") is None:
        return "bwrap (bubblewrap) is not installed"
    if not os.path.realpath(python).startswith("/usr/"):
        return f"the sandbox sees only /usr, and {python} is not under it"
    probe = _run_bubblewrap([python, "-I", "-c", "open('probe', 'w').write('ok')"], b"",
                            SandboxConfig(python=python), {}, "probe")
    if probe.collected == b"ok":
        return None
    return f"bwrap failed ({probe.stderr.strip()[-300:] or f'exit code {probe.returncode}'})"


# ------------------------------------------------------------------------------ bubblewrap

def _bwrap_command(argv: list[str], config: SandboxConfig, memfds: Mapping[str, int],
                   collect: tuple[str, int] | None, info_fd: int) -> list[str]:
    """The bwrap command line; ``memfds`` maps file names to memfds, ``collect`` is
    (file name, pipe fd). The process limit is set inside, where it counts only the
    sandbox's own processes (set outside, all of the user's processes would count)."""
    tmpfs = str(config.tmpfs_mb << 20)
    cmd = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--disable-userns",
           "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox",
           "--clearenv", "--ro-bind", "/usr", "/usr"]
    for name in _USR_ALIASES:
        path = "/" + name
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    for path in ("/dev/shm", "/tmp", SANDBOX_DIR):  # every writable place is capped
        cmd += ["--size", tmpfs, "--tmpfs", path]
    cmd += ["--chdir", SANDBOX_DIR]
    for name, fd in memfds.items():
        cmd += ["--perms", "0755", "--file", str(fd), f"{SANDBOX_DIR}/{name}"]
    for key, value in _minimal_env(SANDBOX_DIR).items():
        cmd += ["--setenv", key, value]
    cmd += ["--remount-ro", "/dev", "--remount-ro", "/", "--info-fd", str(info_fd), "--"]
    limited = ["/usr/bin/prlimit", f"--nproc={config.nproc}", "--", *argv]
    if collect is None:
        return cmd + limited
    name, fd = collect
    # The program's exit status is kept; the file comes back on `fd` behind a "+" that
    # tells a written empty file from none.
    script = f'"$@" {fd}>&-; status=$?; if [ -f {name} ]; then {{ printf +; cat -- {name}; }} >&{fd}; fi; exit $status'
    return cmd + ["/bin/bash", "-c", script, "bash", *limited]  # dash cannot name fds above 9


def _run_bubblewrap(argv: list[str], stdin: bytes, config: SandboxConfig, files: Mapping[str, bytes],
                    collect: str | None) -> SandboxResult:
    ours: list[int] = []  # pipe ends read here
    theirs: list[int] = []  # fds handed to bwrap, closed here once it has them
    try:
        memfds = {}
        for name, data in files.items():
            memfds[name] = _memfd(name, data)
            theirs.append(memfds[name])
        info_read, info_write = _pipe(ours, theirs)
        back = _pipe(ours, theirs) if collect is not None else None
        cmd = _bwrap_command(argv, config, memfds, (collect, back[1]) if back else None, info_write)
        proc = _popen(cmd, "/", {}, config, theirs, sandboxed=True)
    except BaseException:
        _close_all(ours)
        raise
    finally:
        _close_all(theirs)
    init = None
    try:
        init = _sandbox_init(info_read)
        kill = functools.partial(_kill_sandbox, proc, init)
        back_capture = _Capture(back[0], config.output_bytes + 1, False, kill) if back else None
        result = _supervise(proc, stdin, config, kill, signal_in_exit_code=True)
        if back_capture is not None:
            back_capture.thread.join(timeout=5)  # bwrap is gone: the pipe is at its end
    finally:
        if init is not None:
            os.close(init)
        _close_all(ours)
    if back_capture is None:
        return result
    if back_capture.overflowed:
        return dataclasses.replace(result, status=Status.OUTPUT_LIMIT)
    data = bytes(back_capture.data)
    return dataclasses.replace(result, collected=data[1:] if data.startswith(b"+") else None)


def _memfd(name: str, data: bytes) -> int:
    """An anonymous in-memory file holding ``data``, rewound for bwrap to copy."""
    fd = os.memfd_create(name, 0)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pipe(ours: list[int], theirs: list[int]) -> tuple[int, int]:
    read, write = os.pipe()
    ours.append(read)
    theirs.append(write)
    return read, write


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


def _sandbox_init(info_fd: int) -> int | None:
    """A pidfd of the sandbox's PID-namespace init (bwrap's ``--info-fd`` names it): killing
    it kills every process in the namespace, and bwrap exits only once they are gone."""
    data = b""
    while chunk := os.read(info_fd, 4096):
        data += chunk
    try:
        return os.pidfd_open(int(json.loads(data)["child-pid"]))
    except (ValueError, KeyError, TypeError, OSError):  # bwrap failed early, or init already gone
        return None


def _kill_sandbox(proc: subprocess.Popen, init: int | None) -> None:
    """Kill the namespace through its init and wait until bwrap reports it empty."""
    if init is not None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(init, signal.SIGKILL)
        _wait_unreaped(proc, 10)
    _kill_group(proc.pid)


# ------------------------------------------------------------------------- without sandbox

def _run_unsafe(argv: list[str], stdin: bytes, config: SandboxConfig, files: Mapping[str, bytes],
                collect: str | None) -> SandboxResult:
    """rlimits, a new session and a scratch folder: no isolation (``--unsafe-no-sandbox``)."""
    workdir = tempfile.mkdtemp(prefix="pipo-unsafe-")
    try:
        for name, data in files.items():
            path = os.path.join(workdir, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o755)
        proc = _popen(argv, workdir, _minimal_env(workdir), config, [], sandboxed=False)
        result = _supervise(proc, stdin, config, functools.partial(_kill_group, proc.pid),
                            signal_in_exit_code=False)
        path = os.path.join(workdir, collect) if collect else None
        if path is None or not os.path.isfile(path):
            return result
        with open(path, "rb") as f:
            data = f.read(config.output_bytes + 1)
        if len(data) > config.output_bytes:
            return dataclasses.replace(result, status=Status.OUTPUT_LIMIT)
        return dataclasses.replace(result, collected=data)
    finally:
        _remove_tree(workdir)


# ------------------------------------------------------------------------------- processes

def _load_prctl():
    """libc's prctl, loaded in the parent: nothing should be dlopen'ed after fork."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``);
    exit now if the parent is already gone. For grader worker processes."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def _set_limits(config: SandboxConfig, nproc: bool) -> None:
    """Kernel limits, applied in the child between fork and exec (after any change of user,
    which would clear the parent-death signal). ``nproc``: also limit processes."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
    cpu = max(1, math.ceil(config.cpu_s))
    limits = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (config.memory_mb << 20,) * 2,
        resource.RLIMIT_FSIZE: (config.file_bytes,) * 2,
        resource.RLIMIT_NOFILE: (config.nofile,) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    if nproc:
        limits[resource.RLIMIT_NPROC] = (config.nproc,) * 2
    for kind, (soft, hard) in limits.items():
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))


def _popen(cmd: list[str], cwd: str, env: dict[str, str], config: SandboxConfig, pass_fds: list[int],
           sandboxed: bool) -> subprocess.Popen:
    """Start ``cmd`` in a new session under the limits. bwrap (``sandboxed``) started by root
    runs as ``nobody``, so the sandbox maps to an unprivileged host uid; it sets the process
    limit inside."""
    drop = sandboxed and os.geteuid() == 0
    ids = {"user": NOBODY_UID, "group": NOBODY_GID, "extra_groups": []} if drop else {}
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, close_fds=True, pass_fds=pass_fds,
        preexec_fn=functools.partial(_set_limits, config, not sandboxed), **ids,
    )


def _minimal_env(home: str) -> dict[str, str]:
    return {
        "PATH": _PATH,
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


class _Capture:
    """Reads a pipe on a thread, keeping the head (stdout) or the tail (stderr)."""

    def __init__(self, fd: int, limit: int, keep_tail: bool, on_overflow=None) -> None:
        self.data = bytearray()
        self.overflowed = False
        self._fd, self._limit, self._keep_tail, self._on_overflow = fd, limit, keep_tail, on_overflow
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._read_all()
        except OSError:  # the pipe was closed under us after a kill
            pass

    def _read_all(self) -> None:
        while chunk := os.read(self._fd, 65536):
            self.data += chunk
            if len(self.data) <= self._limit:
                continue
            if self._keep_tail:
                del self.data[: len(self.data) - self._limit]
                continue
            del self.data[self._limit:]
            self.overflowed = True
            if self._on_overflow is not None:
                self._on_overflow()
            return


def _feed(pipe, data: bytes) -> None:
    """Write stdin then close it, ignoring a program that stops reading."""
    try:
        pipe.write(data)
    except (BrokenPipeError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            pipe.close()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _wait_unreaped(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for exit without reaping, so the process group id cannot be reused before
    we kill the group. Returns False on timeout."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(pidfd)


def _supervise(proc: subprocess.Popen, stdin: bytes, config: SandboxConfig, kill: Callable[[], None],
               signal_in_exit_code: bool) -> SandboxResult:
    """Feed stdin, capture output, enforce the wall clock, then ``kill`` whatever is left.

    ``signal_in_exit_code``: the launcher reports a signal ``n`` as exit code ``128 + n``
    (bwrap and the shell do).
    """
    start = time.monotonic()
    writer = threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True)
    writer.start()
    out = _Capture(proc.stdout.fileno(), config.output_bytes, False, kill)
    err = _Capture(proc.stderr.fileno(), config.stderr_tail_bytes, True)
    exited = _wait_unreaped(proc, config.wall_limit_s)
    kill()
    returncode = proc.wait()
    wall = time.monotonic() - start
    for thread in (writer, out.thread, err.thread):
        thread.join(timeout=5)
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()
    if signal_in_exit_code and returncode > 128 and returncode - 128 in signal.valid_signals():
        returncode = 128 - returncode
    stderr = err.data.decode("utf-8", errors="replace")
    status = _classify(returncode, exited, out.overflowed, stderr)
    return SandboxResult(status, out.data.decode("utf-8", errors="replace"), stderr, wall, returncode)


_OUT_OF_MEMORY = ("MemoryError", "std::bad_alloc", "Cannot allocate memory")


def _classify(returncode: int, exited: bool, overflowed: bool, stderr: str) -> Status:
    if overflowed:
        return Status.OUTPUT_LIMIT
    if not exited or returncode == -signal.SIGXCPU:
        return Status.TIMEOUT
    if returncode == 0:
        return Status.OK
    lines = stderr.strip().splitlines()
    if "std::bad_alloc" in stderr or (lines and any(marker in lines[-1] for marker in _OUT_OF_MEMORY)):
        return Status.MEMORY
    if returncode < 0:
        return Status.KILLED
    return Status.RUNTIME_ERROR


def _remove_tree(path: str) -> None:
    """Delete a run directory even if the program removed its own permissions."""
    for dirpath, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o700)
    shutil.rmtree(path, ignore_errors=True)
