"""Workflow config: schema validation names the bad key; dotted --config overrides; the paper DAG resolves."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import pytest
import yaml

from pipo.train.stages import OPDStageConfig, SFTStageConfig
from pipo.workflow import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "rules" / "config.schema.yaml"
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


def minimal_config() -> dict:
    """Only what the schema requires, so every other value is the schema's default."""
    model = {"name": "m", "source": None}
    return {"models": {"student": model, "teacher": {**model, "name": "t"}},
            "rollout": {"datasets": {"synthetic": {"shards": 1}}}, "data": {}, "sft": {}, "opd": {},
            "eval": {"benchmarks": {"synthetic_math": {"shards": 1}}, "methods": {"base": ["regular"]}},
            "report": {}, "mlflow": {}, "resources": {"default": {"gpus": 0, "mem_mb": 1, "runtime": 1, "threads": 1}}}


def test_schema_defaults_are_the_librarys_defaults():
    """Each default the schema fills in equals the one of the dataclass or function that reads the value."""
    import inspect

    from pipo.data import sources
    from pipo.data.build import build_data_file
    from pipo.data.synthetic import ArithmeticConfig
    from pipo.engine.options import GenerateOptions
    from pipo.eval.scoring import score_generations
    from pipo.report import DEFAULT_METHOD_ORDER
    from pipo.train.pretrain import PretrainConfig
    from pipo.train.settings import TrainSettings
    from pipo.train.stages import run_cache

    config = minimal_config()
    config["models"]["student"]["pretrain"] = {}
    validate_config(config, SCHEMA)
    fixed = {"model", "dataset", "output_dir", "teacher"}  # set by the workflow
    for section, cls in (("sft", SFTStageConfig), ("opd", OPDStageConfig)):
        expected = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(cls)
                    if f.name not in fixed}
        assert config[section] == {**expected, "pipo": asdict(TrainSettings())}, section
    for section in ("rollout", "eval"):
        assert GenerateOptions.from_section(config[section]) == GenerateOptions(), section
    assert config["models"]["student"]["pretrain"] == {k: v for k, v in asdict(PretrainConfig()).items() if k != "task"}
    assert config["data"]["synthetic"] == asdict(ArithmeticConfig())
    signature = {**inspect.signature(build_data_file).parameters, **inspect.signature(run_cache).parameters}
    assert config["data"]["sft_selection"] == signature["sft_selection"].default
    assert config["data"]["rl_min_accuracy"] == signature["rl_min_accuracy"].default
    assert config["data"]["cache_max_length"] == signature["max_length"].default
    assert config["rollout"]["sft_fraction"] == sources.SFT_FRACTION
    workers = inspect.signature(score_generations).parameters["workers"].default
    assert config["rollout"]["grade_workers"] == config["eval"]["score_workers"] == workers
    assert config["report"]["method_order"] == list(DEFAULT_METHOD_ORDER)


def test_engine_options_have_one_default():
    """`pipo generate`, `pipo serve`, `Engine` and its decode config take their engine defaults from
    `GenerateOptions`; the sampler's defaults are the same numbers."""
    import inspect

    from pipo.cli import build_parser
    from pipo.engine.decoding import DecodeConfig
    from pipo.engine.engine import Engine
    from pipo.engine.options import GenerateOptions
    from pipo.model.sampling import SamplingParams

    defaults = GenerateOptions()
    args = build_parser().parse_args(["generate", "--model", "m", "--method", "pipo", "--input", "i", "--output", "o"])
    parsed = {f.name: getattr(args, {"stop_token_ids": "stop_token_id"}.get(f.name, f.name)) for f in fields(defaults)}
    assert GenerateOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in parsed.items()}) == defaults
    serve = build_parser().parse_args(["serve", "--model", "m"])
    engine = inspect.signature(Engine).parameters
    for name in ("conf_threshold", "eagle_k", "max_seq_len", "gpu_memory_utilization"):
        assert getattr(serve, name) == engine[name].default == getattr(defaults, name), name
    assert engine["max_batch_size"].default == defaults.batch_size
    assert (DecodeConfig().conf_threshold, DecodeConfig().eagle_k) == (defaults.conf_threshold, defaults.eagle_k)
    assert asdict(SamplingParams()) == {f.name: getattr(defaults, f.name) for f in fields(SamplingParams)}


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


@pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake not installed")
@pytest.mark.parametrize("configfile", ["config.yaml", "presets/demo.yaml"])
def test_lint_is_clean(tmp_path, configfile):
    """`snakemake --lint` finds nothing in the workflow, under the paper config and the demo preset."""
    workdir = workflow_copy(tmp_path)
    result = snakemake(workdir, "--lint", "--configfile", configfile)
    assert result.returncode == 0 and "Congratulations" in result.stdout + result.stderr, result.stdout + result.stderr
