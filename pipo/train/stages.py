"""Stage entry points used by the workflow and the CLI: `cache`, `sft`, `merge`, `opd`.

Each stage turns a config dict into ms-swift arguments (LoRA, modules to save, schedule,
DeepSpeed ZeRO-2 and gradient checkpointing on GPU, torchrun via NPROC_PER_NODE), runs
ms-swift, and returns the checkpoint. A rerun after a kill resumes from the newest
`checkpoint-*`; a finished stage leaves `pipo_stage.json` and is not run again.
"""
from __future__ import annotations

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

from pipo.data.records import atomic_write_text
from pipo.errors import PIPOError
from pipo.train.merge import merge_adapter
from pipo.train.settings import TrainSettings, check_field_types
from pipo.train.tracking_callback import tracking_env
from pipo.train.validation import check_dataset, check_teacher_tokenizer, validate_jsonl

PLUGIN = Path(__file__).with_name("plugin.py").resolve()
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES_TO_SAVE = ("compressor", "confidence_head", "mtp.fc", "mtp.pre_fc_norm_embedding", "mtp.pre_fc_norm_hidden", "mtp.norm")
DONE_FILE = "pipo_stage.json"


@dataclass
class SFTStageConfig:
    """SFT stage (spec section 4 recipe by default). `dataset`: chat jsonl or a `pipo cache` folder."""

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
    """OPD stage (spec section 5). `model`: the merged SFT checkpoint; `dataset`: prompt rows."""

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


def _resumable(output_dir: str, argv: list[str]) -> tuple[Path | None, list[str]]:
    """(finished checkpoint, or None and the arguments with `--resume_from_checkpoint` of the newest one)."""
    done = Path(output_dir) / DONE_FILE
    if done.is_file():
        checkpoint = Path(json.loads(done.read_text())["checkpoint"])
        if checkpoint.is_dir():
            return checkpoint, argv
    last = newest_checkpoint(output_dir)
    return None, argv + (["--resume_from_checkpoint", str(last)] if last is not None else [])


def _finish(output_dir: str, config: SFTStageConfig) -> Path:
    checkpoint = newest_checkpoint(output_dir)
    if checkpoint is None:
        raise PIPOError(f"ms-swift finished without a checkpoint in {output_dir}")
    atomic_write_text(Path(output_dir) / DONE_FILE, json.dumps({"checkpoint": str(checkpoint), "config": asdict(config)}, indent=2))
    return checkpoint


def run_sft(config: SFTStageConfig | dict[str, Any]) -> Path:
    """Train PIPO from a backbone (or PIPO checkpoint) with LoRA; returns the final LoRA checkpoint."""
    config = config if isinstance(config, SFTStageConfig) else SFTStageConfig.from_dict(config)
    check_dataset(config.dataset, "sft")
    finished, argv = _resumable(config.output_dir, sft_swift_args(config))
    if finished is not None:
        return finished
    run_swift("sft", argv, config.nproc_per_node)
    return _finish(config.output_dir, config)


def run_opd(config: OPDStageConfig | dict[str, Any]) -> Path:
    """On-policy distillation of a (merged) PIPO student from a teacher; returns the final LoRA checkpoint."""
    config = config if isinstance(config, OPDStageConfig) else OPDStageConfig.from_dict(config)
    check_dataset(config.dataset, "opd")
    if Path(config.model).is_dir() and Path(config.teacher).is_dir():
        check_teacher_tokenizer(config.model, config.teacher)
    finished, argv = _resumable(config.output_dir, opd_swift_args(config))
    if finished is not None:
        return finished
    run_swift("rlhf", argv, config.nproc_per_node)
    return _finish(config.output_dir, config)


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
