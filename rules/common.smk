# Shared names, paths and helpers of the PIPO workflow. Every output lives under results/.
import re
from pathlib import Path

from pipo.engine.options import GenerateOptions

R = "results"
STUDENT = config["models"]["student"]
TEACHER = config["models"]["teacher"]
MODELS = {m["name"]: m for m in (STUDENT, TEACHER)}
VARIANTS = ("base", "sft", "opd", "teacher")
METHODS = ("regular", "pipo", "mtp", "eagle")
# Jobs on the chain pretrain -> rollout -> data -> SFT -> OPD -> merge run before ready evaluation jobs:
# with few cores the chain sets the wall time, and evaluations fill the gaps.
CRITICAL_PATH = 10


def alternatives(names):
    """A wildcard constraint matching exactly these names."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def is_local(model):
    """A `source` naming an existing folder is used as is (no download rule)."""
    return model["source"] is not None and Path(model["source"]).is_dir()


def model_dir(name):
    """Folder of a student/teacher checkpoint: the local source, else results/models/<name>."""
    model = MODELS[name]
    return model["source"] if is_local(model) else f"{R}/models/{name}"


PRETRAINED = [n for n, m in MODELS.items() if "pretrain" in m]  # a tiny model trained from scratch (demo)
HUB_MODELS = [n for n, m in MODELS.items() if n not in PRETRAINED and not is_local(m)]
DATASETS = list(config["rollout"]["datasets"])
BENCHMARKS = list(config["eval"]["benchmarks"])
EVAL_RUNS = [(variant, method) for variant, methods in config["eval"]["methods"].items() for method in methods]


def variant_dir(variant):
    """Checkpoint evaluated as `variant`: base student, merged SFT / OPD PIPO checkpoints, or the teacher."""
    if variant == "base":
        return model_dir(STUDENT["name"])
    if variant == "teacher":
        return model_dir(TEACHER["name"])
    return f"{R}/checkpoints/{STUDENT['name']}/pipo-{variant}"


def variant_model(variant):
    return TEACHER["name"] if variant == "teacher" else STUDENT["name"]


def method_label(variant, method):
    """Row name in the results table: regular/eagle/mtp for base checkpoints, e.g. pipo-sft otherwise."""
    return method if variant in ("base", "teacher") else f"{method}-{variant}"


def generate_options(section):
    """The `GenerateOptions` keys of a config section (rollout / eval): the generate rules' params."""
    return {key: value for key, value in config[section].items() if key in GenerateOptions.__dataclass_fields__}


def shards(section, name):
    return range(config[section][("datasets" if section == "rollout" else "benchmarks")][name]["shards"])


def rollout_files(suffix):
    return [
        f"{R}/rollouts/{TEACHER['name']}/{dataset}/{shard}{suffix}"
        for dataset in DATASETS
        for shard in shards("rollout", dataset)
    ]


def res(rule_name):
    """The rule's resources from config: its own entry over `default` (gpus, mem_mb, runtime, threads, ...)."""
    return {**config["resources"]["default"], **config["resources"].get(rule_name, {})}


def slurm_resources(rule_name):
    """`resources:` of a rule: `gpus` for local scheduling (`--resources gpus=N`), `gpu` for the SLURM executor."""
    values = {k: v for k, v in res(rule_name).items() if k != "threads"}
    values["gpu"] = values["gpus"]
    return values


def threads_of(rule_name):
    return res(rule_name)["threads"]


def log_file(rule_name, *wildcards):
    name = "_".join(f"{{{w}}}" for w in wildcards) or rule_name
    return f"{R}/logs/{rule_name}/{name}.log"


def benchmark_file(rule_name, *wildcards):
    name = "_".join(f"{{{w}}}" for w in wildcards) or rule_name
    return f"{R}/benchmarks/{rule_name}/{name}.tsv"


METRICS = [
    f"{R}/eval/{variant}/{method}/{benchmark}/metrics.json"
    for variant, method in EVAL_RUNS
    for benchmark in BENCHMARKS
]
REPORT_FILES = [f"{R}/tables/{name}" for name in ("main.csv", "main.md", "main.tex", "speed.csv", "speed.md", "summary.csv", "summary.md")]


wildcard_constraints:
    shard=r"\d+",
    variant=alternatives(VARIANTS),
    method=alternatives(METHODS),
    dataset=alternatives(DATASETS),
    benchmark=alternatives(BENCHMARKS),
    stage="sft|opd",


def prepare_tracking():
    """Create the MLflow experiment once, before jobs start (so parallel jobs never race on it)."""
    import warnings

    from pipo.tracking import ensure_experiment, server_reachable, tracking_uri

    uri = tracking_uri(config["mlflow"]["tracking_uri"])
    if not server_reachable(uri):
        warnings.warn(f"MLflow tracking server {uri} unreachable; stages run without tracking")
        return
    try:
        ensure_experiment(uri, config["mlflow"]["experiment"])
    except Exception as err:
        warnings.warn(f"MLflow tracking at {uri} unavailable ({err}); stages run without tracking")
