"""ms-swift model types for PIPO: a loader that converts a regular backbone at the start of SFT.

`pipo_qwen3_5` and `pipo_tiny` load a PIPO checkpoint as is, and a regular checkpoint
(plain or Qwen3.5 vision-language layout) through `PIPOForCausalLM.from_backbone`, so
`swift sft --model <backbone> --model_type pipo_qwen3_5` trains PIPO from the backbone.
`pipo_teacher` loads a regular causal LM as an OPD teacher (ms-swift would otherwise give
the teacher the student's model type and convert it too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from swift.model import ModelLoader, ModelMeta, register_model
from transformers import PretrainedConfig, PreTrainedModel

from pipo.model import backbones
from pipo.model.config import PIPOConfig
from pipo.model.linear_attention import route_gated_delta_rule
from pipo.model.conversion import checkpoint_text_config
from pipo.model.modeling import is_pipo_checkpoint
from pipo.train.merge import load_pipo_base
from pipo.train.settings import TrainSettings
from pipo.train.swift_templates import TEMPLATE_QWEN3_5, TEMPLATE_TINY
from pipo.train.validation import require_pad_token

MODEL_QWEN3_5 = "pipo_qwen3_5"
MODEL_TINY = "pipo_tiny"
MODEL_TEACHER = "pipo_teacher"


def _target_device(device_map: Any) -> str | torch.device | None:
    """A single device from ms-swift's device map, or None when it spreads the model (left as loaded)."""
    if isinstance(device_map, torch.device) or (
        isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")
    ):
        return device_map
    return None


class PIPOModelLoader(ModelLoader):
    """Loads a PIPO checkpoint, or converts a regular backbone into PIPO (fresh heads, docs/method.md section 2)."""

    def get_config(self, model_dir: str) -> PretrainedConfig:
        if is_pipo_checkpoint(model_dir):
            return PIPOConfig.from_pretrained(model_dir)
        text_config, _ = checkpoint_text_config(backbones.read_config_dict(Path(model_dir)), model_dir)
        return PIPOConfig(text_config=text_config.to_dict(), compressor_type=TrainSettings.from_env().compressor_type)

    def get_processor(self, model_dir: str, config: PretrainedConfig):
        processor = super().get_processor(model_dir, config)
        require_pad_token(self._get_tokenizer(processor), f"model {model_dir}")
        return processor

    def get_model(self, model_dir: str, config: PretrainedConfig, processor, model_kwargs: dict[str, Any]) -> PreTrainedModel:
        route_gated_delta_rule()  # the student trains: its linear attention needs a working backward
        dtype = model_kwargs.get("dtype", model_kwargs.get("torch_dtype"))
        settings = TrainSettings(compressor_type=config.compressor_type)
        return load_pipo_base(model_dir, settings, None if dtype == "auto" else dtype,
                              _target_device(model_kwargs.get("device_map")))


def register_models() -> None:
    """Register the PIPO student types and the plain teacher type; idempotent."""
    for model_type, template in ((MODEL_QWEN3_5, TEMPLATE_QWEN3_5), (MODEL_TINY, TEMPLATE_TINY)):
        register_model(ModelMeta(model_type, [], PIPOModelLoader, template=template), exist_ok=True)
    register_model(ModelMeta(MODEL_TEACHER, [], ModelLoader, template=TEMPLATE_TINY), exist_ok=True)
