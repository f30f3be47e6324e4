"""The modules a decoding method needs, from a PIPO checkpoint, a regular checkpoint, or loaded models.

`regular` needs the backbone and LM head; `pipo` a PIPO checkpoint (compressor, MTP and
confidence heads); `mtp` and `eagle` a regular checkpoint with native `mtp.*` weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedConfig, PreTrainedModel

from pipo.engine import METHODS
from pipo.errors import NotAPIPOCheckpointError, PIPOError
from pipo.model import backbones
from pipo.model.heads import MTPHead
from pipo.model.modeling import PIPOForCausalLM, is_pipo_checkpoint

Prompt = list[int] | str | list[dict]


@dataclass
class ModelParts:
    """Backbone (`base`: embed_tokens, layers, norm, rotary_emb), LM head and the heads a method uses."""

    base: nn.Module
    lm_head: nn.Module
    text_config: PreTrainedConfig
    pad_token_id: int | None
    mtp: MTPHead | None = None
    compressor: nn.Module | None = None
    confidence_head: nn.Module | None = None
    name: str = "model"


def build_native_mtp(causal_lm: PreTrainedModel, mtp_state: dict[str, torch.Tensor], source: str) -> MTPHead:
    """The checkpoint's native MTP head (`mtp.*` weights without the prefix) on the backbone's modules."""
    base, config = causal_lm.model, causal_lm.config
    head = MTPHead(config.hidden_size, backbones.norm_factory(base, config), backbones.build_mtp_layer(base, config))
    missing, unexpected = head.load_state_dict(mtp_state, strict=False)
    if missing or unexpected:
        raise PIPOError(f"{source}: native mtp.* weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return head.to(dtype=causal_lm.dtype, device=causal_lm.device)


def load_regular(path: str | Path, with_mtp: bool) -> tuple[PreTrainedModel, MTPHead | None]:
    """A regular checkpoint (plain or the hub's vision-language layout) as a causal LM, plus its native MTP head."""
    from pipo.model.conversion import load_backbone_parts

    parts = load_backbone_parts(path)
    if with_mtp and not parts.mtp_state:
        raise PIPOError(f"{path} has no native mtp.* weights: the mtp and eagle methods need them")
    model = AutoModelForCausalLM.from_config(parts.text_config)
    missing, unexpected = model.load_state_dict(parts.backbone_state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and parts.text_config.tie_word_embeddings)]
    if missing or unexpected:
        raise PIPOError(f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    if parts.dtype is not None:
        model = model.to(parts.dtype)
    mtp = build_native_mtp(model, parts.mtp_state, str(path)) if with_mtp else None
    return model.eval(), mtp


def parts_from_models(model: PreTrainedModel, method: str, mtp: MTPHead | None = None) -> ModelParts:
    """Parts of an already loaded PIPO model, or of a causal LM (with its native MTP head for mtp/eagle)."""
    if method not in METHODS:
        raise PIPOError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(model, PIPOForCausalLM):
        if method in ("mtp", "eagle"):
            raise PIPOError(
                f"method {method!r} uses a regular checkpoint's native MTP head; a PIPO checkpoint's MTP head "
                "predicts token2 of a pair. Run it on the base model instead."
            )
        parts = ModelParts(model.model, model.lm_head, model.config.text_config, model.config.pad_token_id)
        if method == "pipo":
            parts.mtp, parts.compressor, parts.confidence_head = model.mtp, model.compressor, model.confidence_head
        return parts
    if method == "pipo":
        raise NotAPIPOCheckpointError(f"method 'pipo' needs a PIPO checkpoint, got a {type(model).__name__}")
    if method in ("mtp", "eagle") and mtp is None:
        raise PIPOError(f"method {method!r} needs the model's native MTP head (mtp=...)")
    return ModelParts(model.model, model.lm_head, model.config, model.config.pad_token_id, mtp=mtp)


def load_parts(path: str | Path, method: str) -> ModelParts:
    """Load what `method` needs from a checkpoint folder; a regular folder with `pipo` gets a clear error."""
    if is_pipo_checkpoint(path):
        model = PIPOForCausalLM.from_pretrained(str(path)).eval()
        parts = parts_from_models(model, method)
    elif method == "pipo":
        raise NotAPIPOCheckpointError(
            f"{path} is not a PIPO checkpoint: --method pipo needs one (convert and train it first)"
        )
    else:
        model, mtp = load_regular(path, with_mtp=method in ("mtp", "eagle"))
        parts = parts_from_models(model, method, mtp)
    parts.name = str(path)
    return parts


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (needed for chat templates and stop strings)."""
    return AutoTokenizer.from_pretrained(str(path))


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids as given; a text (one user turn) or chat messages through the chat template, generation prompt added."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt and isinstance(prompt[0], dict):
        if tokenizer is None:
            raise PIPOError("text or chat prompts need a tokenizer")
        out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return [int(t) for t in prompt]


def eos_token_ids(path: str | Path | None, config: PreTrainedConfig, tokenizer=None) -> list[int]:
    """End-of-sequence ids from the tokenizer, the config and the generation config, merged."""
    found: list = [getattr(config, "eos_token_id", None)]
    if tokenizer is not None:
        found.append(tokenizer.eos_token_id)
    if path is not None and (Path(path) / "generation_config.json").is_file():
        found.append(GenerationConfig.from_pretrained(str(path)).eos_token_id)
    ids: set[int] = set()
    for item in found:
        ids.update(item if isinstance(item, (list, tuple)) else [item] if item is not None else [])
    return sorted(ids)
