"""Stage entry points used by the workflow and the CLI: `cache`, `sft`, `merge`, `opd`.

Each stage turns a config dict into ms-swift arguments (LoRA, modules to save, schedule,
DeepSpeed ZeRO-2 and gradient checkpointing on GPU, torchrun via NPROC_PER_NODE), runs
ms-swift, and returns the checkpoint. A stage records the fingerprint of its settings and
inputs (`pipo_run.json`) when it starts: a rerun with the same fingerprint after a kill or a
preemption resumes from the newest `checkpoint-*` (log rows written after it are dropped: the
resumed run writes them again); a finished stage leaves `pipo_stage.json` and is not run again.
A changed fingerprint, or a finished run whose `pipo_stage.json` was deleted (Snakemake deletes a
job's outputs for `--forcerun`), trains from scratch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from pipo.errors import PIPOError
from pipo.jsonl import atomic_write_text, drop_partial_last_line, numbered_lines
from pipo.provenance import add_file_stats
from pipo.train.merge import merge_adapter
from pipo.train.settings import TrainSettings, check_field_types
from pipo.train.tracking_callback import tracking_env
from pipo.train.validation import check_dataset, check_teacher_tokenizer, validate_jsonl

PLUGIN = Path(__file__).with_name("plugin.py").resolve()
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES_TO_SAVE = ("compressor", "confidence_head", "mtp.fc", "mtp.pre_fc_norm_embedding", "mtp.pre_fc_norm_hidden", "mtp.norm")
DONE_FILE = "pipo_stage.json"  # completion record: the rule's output
RUN_FILE = "pipo_run.json"  # fingerprint of the run in progress; removed when it finishes
STEP_LOGS = ("logging.jsonl", "completions.jsonl")  # ms-swift's per-step log; GKD's rollouts (--log_completions)


@dataclass
class SFTStageConfig:
    """SFT stage (docs/method.md section 4 recipe by default). `dataset`: chat jsonl or a `pipo cache` folder."""

    model: str
    dataset: str
    output_dir: str
    model_type: str = "pipo_qwen3_5"
    lora_rank: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    modules_to_save: list[str] = field(default_factory=lambda: list(MODULES_TO_SAVE))
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    num_train_epochs: float = 2.0
    max_steps: int = -1
    max_length: int = 65535
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    save_steps: int = 100
    logging_steps: int = 1
    seed: int = 42
    nproc_per_node: int = 1
    deepspeed: str | None = "zero2"  # used on GPU only
    gradient_checkpointing: bool = True  # used on GPU only
    torch_dtype: str | None = None  # default: bfloat16 on GPU, float32 on CPU
    pipo: dict[str, Any] = field(default_factory=dict)  # TrainSettings fields
    extra_args: list[str] = field(default_factory=list)  # passed to ms-swift verbatim

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build from a config section; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PIPOError(f"unknown {cls.__name__} key(s) {unknown}; known: {sorted(known)}")
        missing = [f.name for f in fields(cls) if f.name not in values and f.default is MISSING
                   and f.default_factory is MISSING]
        if missing:
            raise PIPOError(f"missing {cls.__name__} key(s) {missing}")
        check_field_types(cls, values, "")
        config = cls(**values)
        config.settings()  # validates the pipo section early
        return config

    def settings(self) -> TrainSettings:
        known = {f.name for f in fields(TrainSettings)}
        unknown = sorted(set(self.pipo) - known)
        if unknown:
            raise PIPOError(f"unknown pipo training setting(s) {unknown}; known: {sorted(known)}")
        return TrainSettings(**self.pipo)


@dataclass
class OPDStageConfig(SFTStageConfig):
    """OPD stage (docs/method.md section 5). `model`: the merged SFT checkpoint; `dataset`: prompt rows."""

    teacher: str = ""
    teacher_model_type: str | None = None  # default: qwen3_5 for hub VL checkpoints, else pipo_teacher
    lmbda: float = 1.0
    beta: float = 1.0
    temperature: float = 1.0
    max_completion_length: int = 65535
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    save_steps: int = 10

    def __post_init__(self) -> None:
        if not self.teacher:
            raise PIPOError("the OPD stage needs a teacher model (key 'teacher')")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    """The `checkpoint-<step>` folder with the highest step (complete ones only: trainer_state.json written last)."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _dataset_args(dataset: str) -> list[str]:
    """A `pipo cache` folder is consumed as ms-swift's cached dataset, a file as a dataset."""
    path = Path(dataset)
    if (path / "train").is_dir():
        return ["--cached_dataset", str(path / "train")]
    return ["--dataset", dataset]


def common_swift_args(config: SFTStageConfig) -> list[str]:
    """ms-swift arguments shared by SFT and OPD: model, LoRA, schedule, precision, PIPO settings."""
    gpu = on_gpu()
    dtype = config.torch_dtype or ("bfloat16" if gpu else "float32")
    args = [
        "--external_plugins", str(PLUGIN),
        "--model", config.model,
        "--model_type", config.model_type,
        "--check_model", "false",
        "--tuner_type", "lora",
        "--lora_rank", str(config.lora_rank),
        "--lora_alpha", str(config.lora_alpha),
        "--lora_dropout", str(config.lora_dropout),
        "--target_modules", *config.target_modules,
        "--modules_to_save", *config.modules_to_save,
        "--learning_rate", str(config.learning_rate),
        "--warmup_ratio", str(config.warmup_ratio),
        "--num_train_epochs", str(config.num_train_epochs),
        "--max_steps", str(config.max_steps),
        "--max_length", str(config.max_length),
        "--per_device_train_batch_size", str(config.per_device_batch_size),
        "--gradient_accumulation_steps", str(config.gradient_accumulation_steps),
        "--save_steps", str(config.save_steps),
        "--logging_steps", str(config.logging_steps),
        "--seed", str(config.seed),
        "--output_dir", config.output_dir,
        "--add_version", "false",
        "--report_to", "none",
        "--split_dataset_ratio", "0",
        "--dataloader_num_workers", "0",
        "--torch_dtype", dtype,
        "--bf16", str(dtype == "bfloat16").lower(),
        "--fp16", str(dtype == "float16").lower(),
        "--gradient_checkpointing", str(gpu and config.gradient_checkpointing).lower(),
        "--model_kwargs", json.dumps(config.settings().to_model_kwargs()),
    ]
    if gpu and config.deepspeed:
        args += ["--deepspeed", config.deepspeed]
    return args


def sft_swift_args(config: SFTStageConfig) -> list[str]:
    """`swift sft` arguments of the SFT stage."""
    return common_swift_args(config) + _dataset_args(config.dataset) + list(config.extra_args)


def opd_swift_args(config: OPDStageConfig) -> list[str]:
    """`swift rlhf --rlhf_type gkd` arguments of the OPD stage (PIPO trainer via the plugin)."""
    teacher_type = config.teacher_model_type or teacher_model_type(config.teacher)
    return (
        ["--rlhf_type", "gkd"]
        + common_swift_args(config)
        + _dataset_args(config.dataset)
        + [
            "--teacher_model", config.teacher,
            "--teacher_model_type", teacher_type,
            "--lmbda", str(config.lmbda),
            "--beta", str(config.beta),
            "--temperature", str(config.temperature),
            "--max_completion_length", str(config.max_completion_length),
            "--save_only_model", "false",
        ]
        + list(config.extra_args)
    )


def teacher_model_type(teacher: str) -> str:
    """ms-swift's own `qwen3_5` for hub (vision-language) Qwen3.5 teachers; `pipo_teacher` (plain causal LM) otherwise."""
    config = Path(teacher) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") != "qwen3_5":
        return "pipo_teacher"
    return "qwen3_5"


def run_swift(command: str, argv: list[str], nproc_per_node: int = 1) -> None:
    """Run `swift <command>` in this process, or through torchrun (NPROC_PER_NODE) for several GPUs.

    Child processes get the active MLflow run through the environment (`tracking_env`), so
    the trainers' metrics callback logs into it there too.
    """
    if nproc_per_node > 1:
        env = {**os.environ, **tracking_env(), "NPROC_PER_NODE": str(nproc_per_node)}
        subprocess.run([sys.executable, "-m", "swift.cli.main", command, *argv], env=env, check=True)
        return
    if on_gpu():
        for key, value in single_process_env().items():
            os.environ.setdefault(key, value)
    if command == "sft":
        from swift.pipelines import sft_main

        sft_main(argv)
    elif command == "rlhf":
        from swift.pipelines import rlhf_main

        rlhf_main(argv)
    else:
        raise PIPOError(f"unknown ms-swift command {command!r}")


def single_process_env() -> dict[str, str]:
    """Rendezvous variables of a one-process group. DeepSpeed needs torch.distributed even on one GPU;
    torchrun sets these, a plain `pipo sft` on one GPU has none (a launcher's own values are kept)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}


def _input_files(root: Path) -> list[Path]:
    """Files of an input path; the `cache-*.arrow` files that `datasets` adds next to a dataset are not inputs."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not (p.name.startswith("cache-") and p.suffix == ".arrow"))


def stage_fingerprint(config: SFTStageConfig) -> str:
    """Hash of the settings and of every input file's name, size and mtime: cheap for 50 GB models, new after any rewrite."""
    settings = {k: v for k, v in asdict(config).items() if k != "output_dir"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    inputs = [config.model, config.dataset, getattr(config, "teacher", "")]
    for root in (Path(path) for path in inputs if path and Path(path).exists()):
        add_file_stats(digest, root, _input_files(root))
    return digest.hexdigest()


def _read_record(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def prepare_run(output_dir: str | Path, fingerprint: str) -> tuple[Path | None, Path | None]:
    """(finished checkpoint, checkpoint to resume from) of the stage run with this fingerprint in `output_dir`.

    A finished run with this fingerprint is returned as is; an unfinished one (killed,
    preempted) resumes from its newest checkpoint. Anything else starts over, its
    checkpoints removed first so that the trainer cannot pick them up.
    """
    out = Path(output_dir)
    done = _read_record(out / DONE_FILE)
    if done.get("fingerprint") == fingerprint and done.get("checkpoint") and Path(done["checkpoint"]).is_dir():
        return Path(done["checkpoint"]), None
    run = _read_record(out / RUN_FILE)
    if run.get("fingerprint") == fingerprint:
        resume = newest_checkpoint(out)
        drop_log_rows_after(out, json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else 0)
        if resume is not None:
            run["resumed_from"] = [*run.get("resumed_from", []), resume.name]
            atomic_write_text(out / RUN_FILE, json.dumps(run, indent=2))
        return None, resume
    for stale in out.glob("checkpoint-*"):
        shutil.rmtree(stale)
    for stale in (out / DONE_FILE, out / "last-checkpoint", *(out / n for n in STEP_LOGS)):  # ms-swift: symlink, logs
        stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RUN_FILE, json.dumps({"fingerprint": fingerprint, "resumed_from": []}, indent=2))
    return None, None


def _row_step(row: dict[str, Any]) -> int | None:
    """The optimizer step an ms-swift log row was written at; None for a run-level row (arguments, summary)."""
    if "global_step/max_steps" in row:  # logging.jsonl: "3/8"
        return int(str(row["global_step/max_steps"]).split("/")[0])
    step = row.get("step")  # completions.jsonl: one entry per rollout of the step
    if isinstance(step, list):
        step = step[0] if step else None
    return None if step is None else int(step)


def drop_log_rows_after(out: Path, step: int) -> None:
    """Drop the log rows a killed run wrote after its checkpoint at `step` (and a line the kill cut off): the resumed
    run logs those steps again, so its logs end up those of an uninterrupted run, without repeated steps."""
    for path in (out / name for name in STEP_LOGS):
        if not path.is_file():
            continue
        drop_partial_last_line(path)
        kept = []
        for _, line in numbered_lines(path):  # "\n" only: ms-swift's rows may hold U+2028 or \x85 (ensure_ascii=False)
            try:
                row_step = _row_step(json.loads(line))
            except json.JSONDecodeError:
                row_step = None  # not ours to judge: kept as it is
            if row_step is None or row_step <= step:
                kept.append(line)
        atomic_write_text(path, "".join(kept))


def _reached_max_steps(checkpoint: Path) -> bool:
    """A checkpoint saved at the last step (killed before the completion record): resuming would train one step past."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0)


def _train(command: str, argv: list[str], config: SFTStageConfig) -> Path:
    """Run the stage unless finished: resumed, or from scratch (see `prepare_run`); returns the final checkpoint."""
    fingerprint = stage_fingerprint(config)
    finished, resume = prepare_run(config.output_dir, fingerprint)
    if finished is not None:
        return finished
    if resume is None or not _reached_max_steps(resume):
        run_swift(command, argv + (["--resume_from_checkpoint", str(resume)] if resume is not None else []),
                  config.nproc_per_node)
    return _finish(config.output_dir, config, fingerprint)


def _finish(output_dir: str, config: SFTStageConfig, fingerprint: str) -> Path:
    """Write the completion record (with the run's fingerprint and resumes), then drop the in-progress record."""
    out = Path(output_dir)
    checkpoint = newest_checkpoint(out)
    if checkpoint is None:
        raise PIPOError(f"ms-swift finished without a checkpoint in {output_dir}")
    record = {"checkpoint": str(checkpoint), "fingerprint": fingerprint,
              "resumed_from": _read_record(out / RUN_FILE).get("resumed_from", []), "config": asdict(config)}
    atomic_write_text(out / DONE_FILE, json.dumps(record, indent=2))
    (out / RUN_FILE).unlink(missing_ok=True)
    return checkpoint


def run_sft(config: SFTStageConfig | dict[str, Any]) -> Path:
    """Train PIPO from a backbone (or PIPO checkpoint) with LoRA; returns the final LoRA checkpoint."""
    config = config if isinstance(config, SFTStageConfig) else SFTStageConfig.from_dict(config)
    check_dataset(config.dataset, "sft")
    return _train("sft", sft_swift_args(config), config)


def run_opd(config: OPDStageConfig | dict[str, Any]) -> Path:
    """On-policy distillation of a (merged) PIPO student from a teacher; returns the final LoRA checkpoint."""
    config = config if isinstance(config, OPDStageConfig) else OPDStageConfig.from_dict(config)
    check_dataset(config.dataset, "opd")
    if Path(config.model).is_dir() and Path(config.teacher).is_dir():
        check_teacher_tokenizer(config.model, config.teacher)
    return _train("rlhf", opd_swift_args(config), config)


def run_cache(model: str, dataset: str, output_dir: str, model_type: str = "pipo_qwen3_5", max_length: int = 65535) -> Path:
    """Tokenize an SFT jsonl once into `output_dir/train` (token ids in pair layout, see `pipo.train.cache`).

    Built in `<output_dir>.partial` and renamed when complete, so a killed run leaves no
    half cache behind; a rerun starts the export over, a finished cache is returned as is.
    """
    from pipo.train.cache import export_tokenized_cache

    validate_jsonl(dataset, "sft")
    out = Path(output_dir)
    if (out / "train" / "dataset_info.json").is_file():
        return out
    if out.exists():
        raise PIPOError(f"{out} exists but is not a finished cache; remove it and rerun")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    export_tokenized_cache(
        [
            "--external_plugins", str(PLUGIN),
            "--model", model,
            "--model_type", model_type,
            "--dataset", dataset,
            "--to_cached_dataset", "true",
            "--max_length", str(max_length),
            "--split_dataset_ratio", "0",
            "--output_dir", str(staging),
            "--strict", "true",
        ]
    )
    staging.rename(out)
    return out


def run_merge(adapter_dir: str, output_dir: str) -> Path:
    """Merge a LoRA checkpoint into a standalone PIPO checkpoint (see `pipo.train.merge`)."""
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    return merge_adapter(adapter_dir, output_dir, dtype)
