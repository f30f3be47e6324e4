"""The demo DAG end to end on CPU in a temporary copy: report, MLflow runs, partial reruns.

One module-scoped run of `snakemake --configfile presets/demo.yaml --cores 2 all` (minutes)
feeds every test here. The SFT and OPD schedules, the rollout prompts and the evaluation are
shortened (`--config`): the tests check the DAG's wiring, tracking and reruns, not the
recipe's numbers (README shows those).
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import sqlite3

import pytest

from tests.test_workflow_config import SNAKEMAKE, snakemake, workflow_copy

# `--dist loadfile` (pyproject.toml) runs the whole module on one xdist worker: the DAG is built once
pytestmark = [pytest.mark.slow, pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake not installed")]
AFTER_DAG_DB = "mlflow_after_dag.db"  # the MLflow store as the first `all` left it (later reruns add runs)
pytest.importorskip("swift")
DEMO = ("--configfile", "presets/demo.yaml", "--cores", "2")
SHORT_TRAINING = ("--config", "sft={max_steps: 60, save_steps: 60}", "opd={max_steps: 4, save_steps: 4}",
                  "rollout={datasets: {synthetic: {limit: 240}}}",
                  "eval={n: 2, benchmarks: {synthetic_math: {limit: 60}, synthetic_mcq: {limit: 40}}}")


def demo(workdir, *args: str, **kwargs):
    """The demo preset with short SFT / OPD schedules (`--config` goes last: it takes every value after it)."""
    return snakemake(workdir, *DEMO, *args, *SHORT_TRAINING, **kwargs)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    workdir = workflow_copy(tmp_path_factory.mktemp("demo"))
    # about 6 min on 2 idle cores (the hybrid models pretrain on the PyTorch gated delta rule)
    result = demo(workdir, "all", timeout=1500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    shutil.copy(workdir / "results/mlflow.db", workdir / AFTER_DAG_DB)
    return workdir


def test_report_numbers_mean_something(demo_dir):
    with (demo_dir / "results/tables/main.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["model"], r["method"]) for r in rows} == {
        ("tiny-teacher", "regular"), ("tiny-student", "regular"), ("tiny-student", "eagle"),
        ("tiny-student", "mtp"), ("tiny-student", "pipo-sft"), ("tiny-student", "pipo-opd")}
    teacher = json.loads((demo_dir / "results/eval/teacher/regular/synthetic_math/metrics.json").read_text())
    student = json.loads((demo_dir / "results/eval/base/regular/synthetic_math/metrics.json").read_text())
    assert teacher["overall"]["avg@2"] > 0.2 and student["overall"]["avg@2"] > 0.1  # the models learned the task
    assert (demo_dir / "results/tables/main.md").read_text().count("\n") >= 6
    assert list((demo_dir / "results/figures").glob("*.png"))
    for rule in ("pretrain_model", "rollout", "sft", "opd", "generate", "report"):
        assert list((demo_dir / "results/logs" / rule).glob("*.log")), rule
        assert list((demo_dir / "results/benchmarks" / rule).glob("*.tsv")), rule


def test_each_rule_execution_is_one_mlflow_run(demo_dir):
    db = sqlite3.connect(demo_dir / AFTER_DAG_DB)  # tests that rerun rules may have run first
    runs = db.execute("select run_uuid, name, status from runs").fetchall()
    tags = {}
    for run_id, key, value in db.execute("select run_uuid, key, value from tags"):
        tags.setdefault(run_id, {})[key] = value
    params = {(run_id, key) for run_id, key in db.execute("select run_uuid, key from params")}
    jobs = [p for p in (demo_dir / "results/logs").rglob("*.log")]
    assert len(runs) == len(jobs) and all(status == "FINISHED" for _, _, status in runs)
    names = {name for _, name, _ in runs}
    assert "sft[model=tiny-student]" in names and "report[]" in names
    assert "generate[variant=opd,method=pipo,benchmark=synthetic_math,shard=0]" in names
    for run_id, name, _ in runs:
        rule = tags[run_id]["snakemake.rule"]
        assert re.fullmatch(rf"{rule}\[.*\]", name) and "pipo.stage" in tags[run_id], name
    sft = next(r for r, n, _ in runs if n.startswith("sft["))
    assert (sft, "sft.lora_rank") in params and tags[sft]["pipo.model"] == "tiny-student"
    assert db.execute("select count(*) from metrics where run_uuid=? and key='loss'", (sft,)).fetchone()[0] >= 2
    generate = next(r for r, n, _ in runs if n.startswith("generate[variant=base,method=mtp"))
    assert tags[generate]["pipo.method"] == "mtp" and tags[generate]["pipo.benchmark"] in ("synthetic_math", "synthetic_mcq")


def test_forcerun_reruns_only_downstream(demo_dir):
    plan = demo(demo_dir, "-n", "--forcerun", "build_rl", "all")
    assert plan.returncode == 0, plan.stderr
    table = plan.stdout[plan.stdout.index("Job stats:"):]
    planned = dict(re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE))
    assert planned == {"build_rl": "1", "opd": "1", "merge": "1", "generate": "2", "score": "2", "report": "1",
                       "all": "1", "total": "9"}
    table_file = demo_dir / "results/tables/main.csv"
    sft_done = demo_dir / "results/train/tiny-student/sft/pipo_stage.json"
    before = table_file.stat().st_mtime_ns, sft_done.stat().st_mtime_ns
    rerun = demo(demo_dir, "--forcerun", "report", "all")
    assert rerun.returncode == 0, rerun.stderr
    assert table_file.stat().st_mtime_ns > before[0] and sft_done.stat().st_mtime_ns == before[1]
    assert demo(demo_dir, "-n", "all").stdout.count("rule ") == 0  # nothing left to do
