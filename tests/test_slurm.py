"""The demo DAG through a real single-node SLURM cluster (`tests/slurm_cluster.py`) with `snakemake --profile slurm`.

With accounting (MariaDB + slurmdbd, job states by `sacct`): the whole demo DAG, with its SFT job
killed after its first checkpoint, so that the resubmitted job resumes from it; then
`--forcerun opd` retrains OPD from step 1 and reruns exactly the jobs downstream of it. Without
accounting (job states by `squeue`): a short DAG slice. Training is shortened with `--config`.

The test starts daemons as root and writes /etc/slurm: it runs in CI (`CI=true`), where a cluster
that cannot start fails it, and elsewhere only with PIPO_TEST_SLURM=1.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from pipo.train.stages import newest_checkpoint
from tests.slurm_cluster import LocalCluster, missing_packages
from tests.test_workflow_config import ROOT, SNAKEMAKE, workflow_copy

IN_CI = os.environ.get("CI", "").lower() == "true"
WANTED = IN_CI or os.environ.get("PIPO_TEST_SLURM") == "1"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not WANTED, reason="starts SLURM daemons as root and writes /etc/slurm: "
                                          "set PIPO_TEST_SLURM=1 to run (CI=true does)"),
]
pytest.importorskip("swift")
DEMO = yaml.safe_load((ROOT / "presets/demo.yaml").read_text())
STUDENT = DEMO["models"]["student"]["name"]
SFT_STEPS, OPD_STEPS = 40, 4
SHORT = ("--config", f"sft={{max_steps: {SFT_STEPS}, save_steps: 5}}", f"opd={{max_steps: {OPD_STEPS}, save_steps: 2}}",
         "eval={benchmarks: {%s}}" % ", ".join(f"{name}: {{limit: 16}}" for name in DEMO["eval"]["benchmarks"]),
         "resources={sft: {gpus: 1}}")  # short training and evaluation; SFT is the GPU rule


@contextmanager
def cluster(accounting: bool):
    """A running local cluster; in CI a cluster that cannot start fails the test, elsewhere it is skipped."""
    if SNAKEMAKE is None or os.geteuid() != 0 or missing_packages(accounting):
        why = ("snakemake not installed" if SNAKEMAKE is None else "not root" if os.geteuid() != 0
               else f"missing Debian packages {missing_packages(accounting)}")
        (pytest.fail if IN_CI else pytest.skip)(f"cannot start a SLURM cluster: {why}")
    with LocalCluster(accounting) as running:
        yield running


def profile_run(workdir: Path, *args: str, timeout: int = 1500) -> subprocess.Popen:
    """`snakemake --profile slurm ARGS` in the background (output in workdir/snakemake-<n>.log)."""
    env = {"PATH": f"{Path(SNAKEMAKE).parent}:/usr/local/bin:/usr/bin:/usr/sbin:/bin", "HOME": str(workdir),
           "HF_HUB_OFFLINE": "1", **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}
    log = workdir / f"snakemake-{len(list(workdir.glob('snakemake-*.log')))}.log"
    process = subprocess.Popen([SNAKEMAKE, "--profile", "slurm", *args], cwd=workdir, env=env,
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    process.log, process.timeout = log, timeout
    return process


def finish(process: subprocess.Popen) -> str:
    """Wait for a `profile_run`; its output, after asserting it succeeded."""
    try:
        process.wait(timeout=process.timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    output = process.log.read_text()
    assert process.returncode == 0, output[-6000:]
    return output


def submitted(output: str) -> dict[str, str]:
    """SLURM job id -> rule, from the plugin's 'submitted with SLURM jobid' lines."""
    return dict(re.findall(r"has been submitted with SLURM jobid (\d+) \(log: \S+/rule_(\w+)/", output))


def executed(output: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of each job Snakemake started."""
    return [(rule, wildcards or "") for rule, wildcards in
            re.findall(r"^(?:local)?rule (\w+):\n(?:    (?!wildcards).*\n)*(?:    wildcards: (.*))?", output, re.MULTILINE)]


def sacct_states(wanted: Iterable[str] = (), timeout: float = 60.0) -> dict[str, tuple[str, str]]:
    """SLURM job id -> (state, allocated TRES) from accounting, once it lists every `wanted` job id (or `timeout`
    passed): slurmctld hands job records to slurmdbd asynchronously, and on a loaded machine the first job's
    record lagged the end of the run (CI, 2026-12-02)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = subprocess.run(["sacct", "-X", "-n", "--parsable2", "--format=JobIdRaw,State,AllocTRES"],
                              capture_output=True, text=True, check=True).stdout.splitlines()
        states = {jobid: (state.split()[0], tres) for jobid, state, tres in (row.split("|") for row in rows)}
        if set(wanted) <= set(states) or time.monotonic() > deadline:  # state "CANCELLED by 0": its first word
            return states
        time.sleep(1)


def kill_sft_after_first_checkpoint(workdir: Path, run: subprocess.Popen) -> int:
    """Wait for SFT's first checkpoint, SIGKILL its job's processes; the step of the newest checkpoint it left.

    Killing the processes (as the OOM killer or a dying node does) makes the job FAILED. Not `scancel`:
    the plugin (2.8.0) reads sacct's "CANCELLED by <uid>" as still running and waits forever.
    """
    out = workdir / f"results/train/{STUDENT}/sft"
    deadline = time.monotonic() + 1800
    while newest_checkpoint(out) is None:
        assert run.poll() is None and time.monotonic() < deadline, run.log.read_text()[-4000:]
        time.sleep(0.5)
    jobs = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"], capture_output=True, text=True).stdout
    sft = [line.split("|")[0] for line in jobs.splitlines() if line.split("|")[1].startswith("rule_sft_")]
    assert sft, f"no running SFT job to kill: {jobs!r}"
    listed = subprocess.run(["scontrol", "listpids", sft[0]], capture_output=True, text=True, check=True).stdout
    for pid in re.findall(r"^(\d+)\s", listed, re.MULTILINE):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    step = int(newest_checkpoint(out).name.split("-")[1])
    assert step < SFT_STEPS, "SFT finished before it was killed"
    return step


def test_demo_dag_on_slurm_with_and_without_accounting(tmp_path):
    """One test, so that xdist never runs two clusters at once: accounting first, then the slice without."""
    for folder in ("accounting", "none"):
        (tmp_path / folder).mkdir()
    demo_dag_with_accounting(workflow_copy(tmp_path / "accounting"))
    dag_slice_without_accounting(workflow_copy(tmp_path / "none"))


def demo_dag_with_accounting(workdir: Path) -> None:
    with cluster(accounting=True):
        started = time.monotonic()
        run = profile_run(workdir, "all", "--configfile", "presets/demo.yaml", *SHORT)
        try:
            killed_at = kill_sft_after_first_checkpoint(workdir, run)
            output = finish(run)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        assert "slurm profile: accounting answers: job states by sacct, account pipo" in output
        assert "invalid option" not in output  # no account guess: the profile named the account
        jobs = submitted(output)
        states = sacct_states(jobs)
        assert set(jobs.values()) >= {"sft", "merge", "opd", "generate", "score", "report"} and set(jobs) <= set(states)
        assert [states[j][0] for j, rule in jobs.items() if rule == "sft"] == ["FAILED", "COMPLETED"]
        assert all(state == "COMPLETED" for j, (state, _) in states.items() if jobs.get(j) != "sft")
        assert all("gres/gpu=1" in states[j][1] for j, rule in jobs.items() if rule == "sft")
        assert not any("gres/gpu" in states[j][1] for j, rule in jobs.items() if rule == "opd")

        sft_dir = workdir / f"results/train/{STUDENT}/sft"
        done = json.loads((sft_dir / "pipo_stage.json").read_text())
        assert done["checkpoint"].endswith(f"checkpoint-{SFT_STEPS}") and len(done["resumed_from"]) == 1
        assert killed_at <= int(done["resumed_from"][0].split("-")[1]) < SFT_STEPS  # the resubmitted job resumed
        killed = min((j for j, rule in jobs.items() if rule == "sft"), key=int)
        assert (workdir / "results/logs/slurm/rule_sft" / STUDENT / f"{killed}.log").is_file()  # failed job's log kept
        db = sqlite3.connect(workdir / "results/mlflow.db")
        tagged = {value for (value,) in db.execute("select value from tags where key = 'slurm.job_id'")}
        assert set(jobs) - {killed} <= tagged

        opd_dir = workdir / f"results/train/{STUDENT}/opd"
        before = (opd_dir / f"checkpoint-{OPD_STEPS}" / "trainer_state.json").stat().st_mtime_ns
        forced = finish(profile_run(workdir, "all", "--configfile", "presets/demo.yaml", *SHORT, "--forcerun", "opd"))
        print(f"SLURM demo DAG with accounting, a killed SFT job and --forcerun opd: {time.monotonic() - started:.0f} s")
        reran = executed(forced)
        assert sorted(rule for rule, _ in reran if rule not in ("generate", "score")) == ["all", "merge", "opd", "report"]
        assert ("merge", f"model={STUDENT}, stage=opd") in reran
        assert sorted(w for rule, w in reran if rule == "generate") == sorted(
            f"variant=opd, method={m}, benchmark={b}, shard={s}"
            for m in DEMO["eval"]["methods"]["opd"] for b, spec in DEMO["eval"]["benchmarks"].items()
            for s in range(spec["shards"]))
        assert sorted(w for rule, w in reran if rule == "score") == sorted(
            f"variant=opd, method={m}, benchmark={b}" for m in DEMO["eval"]["methods"]["opd"] for b in DEMO["eval"]["benchmarks"])
        state = json.loads((opd_dir / f"checkpoint-{OPD_STEPS}" / "trainer_state.json").read_text())
        steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
        assert steps == list(range(1, OPD_STEPS + 1)) and state["global_step"] == OPD_STEPS  # from step 1, not 9/8
        assert (opd_dir / f"checkpoint-{OPD_STEPS}" / "trainer_state.json").stat().st_mtime_ns > before
        assert json.loads((opd_dir / "pipo_stage.json").read_text())["resumed_from"] == []


def dag_slice_without_accounting(workdir: Path) -> None:
    with cluster(accounting=False):
        started = time.monotonic()
        dataset, benchmark = next(iter(DEMO["rollout"]["datasets"])), next(iter(DEMO["eval"]["benchmarks"]))
        targets = [f"results/data/bench/{benchmark}.jsonl", f"results/data/prompts/{dataset}.jsonl"]
        output = finish(profile_run(workdir, *targets, "--configfile", "presets/demo.yaml",
                                    "--config", "resources={prompts: {gpus: 1}}", timeout=900))
        print(f"SLURM DAG slice without accounting: {time.monotonic() - started:.0f} s")
        assert "slurm profile: no accounting (sacct fails): job states by squeue, MinJobAge=600s" in output
        assert "Falling back to 'sacct'" not in output
        jobs = submitted(output)
        assert sorted(jobs.values()) == ["benchmark", "prompts"]
        for jobid, rule in jobs.items():
            shown = subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True, check=True).stdout
            assert "JobState=COMPLETED" in shown
            assert ("gres:gpu:1" in shown or "gres/gpu=1" in shown) == (rule == "prompts"), shown
        assert all((workdir / target).exists() for target in targets)
