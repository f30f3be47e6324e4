"""Merge a PIPO LoRA checkpoint into a standalone PIPO checkpoint (`PIPOForCausalLM.from_pretrained` loads it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer

from pipo.errors import PIPOError
from pipo.model.modeling import PIPOForCausalLM, is_pipo_checkpoint
from pipo.train.settings import TrainSettings
from pipo.train.validation import require_pad_token


def adapter_base(adapter_dir: str | Path) -> tuple[str, TrainSettings]:
    """The model an adapter was trained on and its PIPO settings, from the checkpoint's `args.json`."""
    args_path = Path(adapter_dir) / "args.json"
    if not (Path(adapter_dir) / "adapter_config.json").is_file() or not args_path.is_file():
        raise PIPOError(f"{adapter_dir} is not an ms-swift LoRA checkpoint (adapter_config.json and args.json needed)")
    args = json.loads(args_path.read_text())
    model_kwargs = args.get("model_kwargs") or {}
    return args["model"], TrainSettings.from_env({k.upper(): str(v) for k, v in model_kwargs.items()})


def _refuse_generate(*args, **kwargs):
    raise PIPOError("PIPO decoding does not run through transformers' generate(): use pipo.engine or pipo.model.reference")


def peft_ready(model: PIPOForCausalLM) -> PIPOForCausalLM:
    """PEFT's causal-LM wrapper reads `prepare_inputs_for_generation`; PIPO has none (decoding is not `generate()`)."""
    model.prepare_inputs_for_generation = _refuse_generate
    return model


def load_pipo_base(
    model: str, settings: TrainSettings, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> PIPOForCausalLM:
    """The PIPO model before LoRA: a PIPO checkpoint as is, or a backbone converted the way the loader did.

    With a `device` the weights are loaded straight onto it (no CPU copy of the whole model first).
    """
    if is_pipo_checkpoint(model):
        placement = {"device_map": device} if device is not None else {}
        return peft_ready(PIPOForCausalLM.from_pretrained(model, dtype=dtype, **placement))
    pad_id = require_pad_token(AutoTokenizer.from_pretrained(model), f"model {model}")
    return peft_ready(PIPOForCausalLM.from_backbone(model, settings.compressor_type, pad_token_id=pad_id, dtype=dtype,
                                                    device=device))


def load_adapter_model(adapter_dir: str | Path, dtype: torch.dtype | None = None) -> PeftModel:
    """The unmerged model of a LoRA checkpoint: PIPO base + LoRA + trained `modules_to_save`."""
    base, settings = adapter_base(adapter_dir)
    return PeftModel.from_pretrained(load_pipo_base(base, settings, dtype), str(adapter_dir))


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Merge LoRA into the weights and write a PIPO checkpoint with the base's tokenizer.

    Written to a temporary sibling folder and renamed at the end, so a killed merge never
    leaves a half-written checkpoint behind; an existing merged checkpoint is returned as is.
    """
    output_dir = Path(output_dir)
    if is_pipo_checkpoint(output_dir):
        return output_dir
    base, _ = adapter_base(adapter_dir)
    merged = load_adapter_model(adapter_dir, dtype).merge_and_unload()
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    AutoTokenizer.from_pretrained(base).save_pretrained(staging)
    shutil.rmtree(output_dir, ignore_errors=True)
    staging.rename(output_dir)
    return output_dir
