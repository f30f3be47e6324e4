"""Workflow config: schema validation names the bad key; dotted --config overrides; the paper DAG resolves."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from pipo.train.stages import OPDStageConfig, SFTStageConfig
from pipo.workflow import ConfigError, generate_args, validate_config

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "rules" / "config.schema.json"
WORKFLOW_FILES = ("Snakefile", "rules", "workflow_scripts", "presets", "config.yaml", "slurm", "envs")
SNAKEMAKE = shutil.which("snakemake")


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", ["config.yaml", "presets/demo.yaml"])
def test_shipped_configs_are_valid(name):
    validate_config(load(name), SCHEMA)


def test_unknown_key_and_wrong_type_are_named():
    config = load("config.yaml")
    config["sft"]["lerning_rate"] = 1e-4
    config["eval"]["n"] = "four"
    with pytest.raises(ConfigError) as err:
        validate_config(config, SCHEMA)
    message = str(err.value)
    assert "unknown config key(s) ['sft.lerning_rate']" in message
    assert "config key 'eval.n': 'four' is not of type 'integer'" in message


def test_stage_sections_only_hold_stage_config_keys():
    """The schema's sft/opd keys are keys of the stage dataclasses (no drift between them)."""
    import json

    schema = json.loads(SCHEMA.read_text())["properties"]
    fixed = {"model", "dataset", "output_dir", "teacher"}  # set by the workflow
    assert set(schema["sft"]["properties"]) == {f.name for f in fields(SFTStageConfig)} - fixed
    assert set(schema["opd"]["properties"]) == {f.name for f in fields(OPDStageConfig)} - fixed


def test_generate_args_follow_the_section():
    assert generate_args({"n": 4, "top_p": 0.95, "backend": "native", "datasets": {}, "conf_threshold": None}) == [
        "--n", "4", "--top-p", "0.95", "--backend", "native"]


def workflow_copy(tmp_path: Path) -> Path:
    for name in WORKFLOW_FILES:
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    return tmp_path


def snakemake(workdir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(SNAKEMAKE).parent) + ":/usr/bin:/bin", "HOME": str(workdir), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}  # this checkout's `pipo`, not whichever one is installed
    return subprocess.run([SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake not installed")
def test_paper_dag_resolves_with_slurm_resources(tmp_path):
    """`snakemake -n` of the paper config: every rule, no network, SLURM resources from config.

    The `eval={n: 8}` override is merged into the section (were it replaced, the required
    `eval.benchmarks` would be missing and validation would stop the run)."""
    workdir = workflow_copy(tmp_path)
    result = snakemake(workdir, "-n", "--profile", "slurm", "all", "--config", "eval={n: 8}")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for rule in ("download_model", "prompts", "benchmark", "rollout", "grade", "build_sft", "build_rl",
                 "cache_sft", "sft", "merge", "opd", "generate", "score", "report"):
        assert f"rule {rule}:" in out, rule
    sft = out[out.index("rule sft:"):]
    assert "gpus=8" in sft[: sft.index("\n\n")] and "gpu=8" in sft[: sft.index("\n\n")]
    assert "runtime=2880" in sft[: sft.index("\n\n")]
    assert "results/eval/opd/pipo/livecodebench/3.generations.jsonl" in out


@pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake not installed")
def test_bad_override_stops_the_run_naming_the_key(tmp_path):
    workdir = workflow_copy(tmp_path)
    result = snakemake(workdir, "-n", "--cores", "1", "all", "--config", "rollout={n: many}")
    assert result.returncode != 0
    assert "config key 'rollout.n': 'many' is not of type 'integer'" in result.stdout + result.stderr
