"""A real single-node SLURM cluster for tests: munged, slurmctld, slurmd, and with accounting MariaDB + slurmdbd.

Needs root and the Debian packages munge, slurmctld, slurmd, slurm-client (accounting: slurmdbd,
mariadb-server); `.ci/run` installs them. Every daemon runs in the foreground as a child of the
test process and is stopped by its pid. The node `gpu` partition has two fake GPUs
(`/dev/fakegpu0-1` -> /dev/null), so `gpus: 1` jobs get `gres:gpu:1`. The configuration goes to
`/etc/slurm` because the job-step plugin clears `SLURM_CONF`.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ETC = Path("/etc/slurm")
STATE = Path("/var/lib/pipo-test-slurm")
ACCOUNT = "pipo"
CLUSTER = "pipo"
DB_USER, DB_PASSWORD, DB_NAME = "slurm", "pipo-test", "slurm_acct_db"
DB_PORT = 3399  # not 3306: a MariaDB that the package started may hold it
PACKAGES = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client"}
ACCOUNTING_PACKAGES = {"slurmdbd": "slurmdbd", "mariadbd": "mariadb-server"}


class ClusterError(RuntimeError):
    """The cluster could not be started; the message names the step and the daemon log."""


def missing_packages(accounting: bool) -> list[str]:
    """Debian packages whose programs are not installed (empty: the cluster can be tried)."""
    wanted = {**PACKAGES, **(ACCOUNTING_PACKAGES if accounting else {})}
    search = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return sorted({pkg for program, pkg in wanted.items() if shutil.which(program, path=search) is None})


def _program(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def _memory_mb() -> int:
    """Node memory for slurm.conf: 80% of MemTotal (RealMemory above the real amount drains the node)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 8 // 10240
    raise ClusterError("no MemTotal in /proc/meminfo")


def slurm_conf(host: str, cpus: int, memory_mb: int, accounting: bool, state: Path) -> str:
    """slurm.conf of a one-node cluster with a `gpu` partition (see SLURM notes in README)."""
    storage = (
        ["AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost", "AccountingStorageTRES=gres/gpu",
         "JobAcctGatherType=jobacct_gather/linux"]
        if accounting
        else ["AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none"]
    )
    return "\n".join([
        f"ClusterName={CLUSTER}",
        f"SlurmctldHost={host}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        f"StateSaveLocation={state}/ctld",
        f"SlurmdSpoolDir={state}/d",
        f"SlurmctldPidFile={state}/slurmctld.pid",
        f"SlurmdPidFile={state}/slurmd.pid",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU_Memory",
        "DefMemPerCPU=1000",
        "MinJobAge=600",
        "ReturnToService=2",
        "SchedulerType=sched/backfill",
        "GresTypes=gpu",
        *storage,
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:2 State=UNKNOWN",
        f"PartitionName=gpu Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


class LocalCluster:
    """Start with `start()`, stop with `stop()` (every daemon by its pid, newest first)."""

    def __init__(self, accounting: bool, state: Path = STATE) -> None:
        self.accounting = accounting
        self.state = state
        self.host = socket.gethostname().split(".")[0]
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self) -> "LocalCluster":
        if os.geteuid() != 0:
            raise ClusterError("a local SLURM cluster needs root (daemons, /etc/slurm, /etc/munge)")
        missing = missing_packages(self.accounting)
        if missing:
            raise ClusterError(f"missing Debian packages: {' '.join(missing)} (apt-get install them)")
        shutil.rmtree(self.state, ignore_errors=True)
        for sub in ("ctld", "d", "logs"):
            (self.state / sub).mkdir(parents=True)
        try:
            self._start_munge()
            if self.accounting:
                self._start_database()
            self._write_config()
            if self.accounting:
                self._spawn("slurmdbd", [_program("slurmdbd"), "-D"])
                self._wait("slurmdbd to answer", lambda: self._ok(["sacctmgr", "-n", "list", "cluster"]))
                self._register_account()
            self._spawn("slurmctld", [_program("slurmctld"), "-D", "-i", "-f", str(ETC / "slurm.conf")])
            self._wait("slurmctld to answer", lambda: self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"]))
            self._spawn("slurmd", [_program("slurmd"), "-D", "-f", str(ETC / "slurm.conf")])
            self._wait("the node to be idle", self._node_idle)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel the cluster's jobs (their job steps outlive slurmd), then SIGTERM each daemon by pid, newest first."""
        if any(name == "slurmctld" and p.poll() is None for name, p in self.processes):
            subprocess.run(["scancel", "--full", "--user", getpass.getuser()], capture_output=True, timeout=30)
            try:
                self._wait("the cancelled jobs to end", lambda: not self._out(["squeue", "-h"]).strip(), timeout=60)
            except ClusterError:
                pass  # a daemon died or a job hangs: stopping the daemons below is all that is left to do
        while self.processes:
            _, process = self.processes.pop()
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.state / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    def _spawn(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.state / "logs" / f"{name}.log", "ab")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, **kwargs)
        self.processes.append((name, process))
        return process

    def _wait(self, what: str, ready, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [name for name, p in self.processes if p.poll() is not None]
            if dead:
                raise ClusterError(f"{dead[0]} exited while waiting for {what}: {self.log_tail(dead[0])}")
            if ready():
                return
            time.sleep(0.5)
        logs = "\n".join(f"--- {name}\n{self.log_tail(name, 1500)}" for name, _ in self.processes)
        raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")

    @staticmethod
    def _ok(argv: list[str]) -> bool:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0

    @staticmethod
    def _out(argv: list[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout

    def _start_munge(self) -> None:
        """munged as user munge, with the key and folders it insists on (owner munge, mode 0700)."""
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            subprocess.run([_program("mungekey"), "--create"], check=True, capture_output=True)
        for folder in ("/etc/munge", "/var/log/munge", "/var/lib/munge", "/run/munge"):
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
            os.chmod(folder, 0o755 if folder == "/run/munge" else 0o700)
        shutil.chown(key, "munge", "munge")
        os.chmod(key, 0o400)
        socket_file = Path("/run/munge/munge.socket.2")
        if self._ok(["bash", "-c", "munge -n | unmunge"]):
            return  # a munged is already serving (started earlier): reuse it
        for stale in (socket_file, Path(str(socket_file) + ".lock"), Path("/run/munge/munged.pid")):
            stale.unlink(missing_ok=True)
        self._spawn("munged", [_program("munged"), "--foreground"], user="munge")
        self._wait("munge", lambda: self._ok(["bash", "-c", "munge -n | unmunge"]))

    def _start_database(self) -> None:
        """MariaDB on a private socket and data folder, with the slurmdbd database and user."""
        data, run = self.state / "mysql", self.state / "mysqld"
        run.mkdir()
        shutil.chown(run, "mysql", "mysql")
        subprocess.run([_program("mariadb-install-db"), "--user=mysql", f"--datadir={data}",
                        "--auth-root-authentication-method=socket", "--skip-test-db"],
                       check=True, capture_output=True)
        self.socket = run / "mysqld.sock"
        self._spawn("mariadbd", [_program("mariadbd"), "--user=mysql", f"--datadir={data}",
                                 f"--socket={self.socket}", f"--pid-file={run}/mysqld.pid", "--skip-networking=0",
                                 "--bind-address=127.0.0.1", f"--port={DB_PORT}", "--innodb-buffer-pool-size=64M"])
        sql = ["mariadb", f"--socket={self.socket}", "-uroot"]
        self._wait("MariaDB", lambda: self._ok([*sql, "-e", "select 1"]))
        script = (f"CREATE DATABASE IF NOT EXISTS {DB_NAME};"
                  f"CREATE USER IF NOT EXISTS '{DB_USER}'@'localhost' IDENTIFIED BY '{DB_PASSWORD}';"
                  f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'localhost';FLUSH PRIVILEGES;")
        subprocess.run([*sql, "-e", script], check=True, capture_output=True)

    def _write_config(self) -> None:
        ETC.mkdir(parents=True, exist_ok=True)
        for index in range(2):
            fake = Path(f"/dev/fakegpu{index}")
            if not fake.is_symlink():
                fake.symlink_to("/dev/null")
        (ETC / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File=/dev/fakegpu[0-1]\n")
        (ETC / "cgroup.conf").unlink(missing_ok=True)
        (ETC / "slurm.conf").write_text(
            slurm_conf(self.host, os.cpu_count() or 1, _memory_mb(), self.accounting, self.state))
        if self.accounting:
            dbd = ETC / "slurmdbd.conf"
            dbd.write_text("\n".join([
                "AuthType=auth/munge", "DbdHost=localhost", "SlurmUser=root",
                f"PidFile={self.state}/slurmdbd.pid",
                "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1", f"StoragePort={DB_PORT}",
                f"StorageUser={DB_USER}", f"StoragePass={DB_PASSWORD}", f"StorageLoc={DB_NAME}", "",
            ]))
            os.chmod(dbd, 0o600)

    def _register_account(self) -> None:
        """The cluster, an account and root in it, so jobs have an association and `sacct` lists them."""
        for argv in (["add", "cluster", CLUSTER], ["add", "account", ACCOUNT, f"cluster={CLUSTER}"],
                     ["add", "user", "root", f"account={ACCOUNT}", f"cluster={CLUSTER}", f"defaultaccount={ACCOUNT}"]):
            subprocess.run(["sacctmgr", "-i", *argv], capture_output=True, timeout=60)

    def _node_idle(self) -> bool:
        state = self._out(["sinfo", "-h", "-N", "-o", "%T"]).strip()
        if state.startswith(("down", "drain")):
            subprocess.run(["scontrol", "update", f"NodeName={self.host}", "State=RESUME"], capture_output=True)
        return state == "idle"
