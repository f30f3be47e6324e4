"""What `snakemake -n` plans on a finished results tree: reruns after a parameter change, `--forcerun` of a
training stage, `--until`, and one target file (nothing is trained: a few dry runs).

The tree is a stub: every output of the demo DAG made empty (folders for `directory()`
outputs), then `snakemake --touch` marks them up to date in DAG order and records each
job's metadata (params, code), as a finished run would have.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_workflow_config import SNAKEMAKE, snakemake, workflow_copy

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake not installed")
DEMO = ("--configfile", "presets/demo.yaml")
DIRECTORY_RULES = {"pretrain_model", "cache_sft", "merge"}  # rules whose output is a `directory()`
DIRECTORY_OUTPUTS = {"results/figures"}  # the report rule's plots, next to its table files
# the demo's evaluation: 2 benchmarks x 1 shard; sft and opd each evaluated with [pipo]
AFTER_OPD = {"opd": 1, "merge": 1, "generate": 2, "score": 2, "report": 1, "all": 1}


def plan(workdir: Path, *args: str) -> dict[str, int]:
    """Jobs per rule that `snakemake -n` would run (the "Job stats" table); {} when nothing is to be done."""
    result = snakemake(workdir, *DEMO, "-n", *args)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    if "Nothing to be done" in out:
        return {}
    table = out[out.index("Job stats:"):].split("\n\n")[0].splitlines()[3:]  # title, header, rule line
    return {name: int(count) for name, count in (line.split() for line in table) if name != "total"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A workflow copy whose demo results exist and are up to date, with Snakemake's job metadata."""
    workdir = workflow_copy(tmp_path_factory.mktemp("plan"))
    summary = snakemake(workdir, *DEMO, "-n", "--detailed-summary", "all")
    assert summary.returncode == 0, summary.stderr[-3000:]
    for line in summary.stdout.splitlines()[1:]:
        output, _, rule = line.split("\t")[:3]
        path = workdir / output
        if rule in DIRECTORY_RULES or output in DIRECTORY_OUTPUTS:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    touched = snakemake(workdir, *DEMO, "--touch", "--cores", "1", "all")
    assert touched.returncode == 0, touched.stderr[-3000:]
    return workdir


def test_finished_tree_plans_nothing(tree):
    assert plan(tree, "all") == {}


def test_changed_training_parameter_reruns_the_stage_and_everything_after_it(tree):
    """Snakemake's params trigger: `sft` params are the config's `sft` section."""
    assert plan(tree, "all", "--config", "sft={learning_rate: 1.0e-3}") == {
        "sft": 1, "merge": 2, "opd": 1, "generate": 4, "score": 4, "report": 1, "all": 1}


def test_forcerun_of_a_training_stage_reruns_downstream_only(tree):
    assert plan(tree, "all", "--forcerun", "opd") == AFTER_OPD


def test_until_stops_at_the_named_rule(tree):
    """(`--until opd all` instead trips Snakemake 9's dry-run "Out of jobs ready to be started" BUG message.)"""
    assert plan(tree, "--forcerun", "sft", "--until", "opd") == {"sft": 1, "merge": 1, "opd": 1}


def test_single_target_file_plans_only_its_dependencies(tree):
    target = "results/eval/sft/pipo/synthetic_math/metrics.json"
    assert plan(tree, target, "--forcerun", "sft") == {"sft": 1, "merge": 1, "generate": 1, "score": 1}
