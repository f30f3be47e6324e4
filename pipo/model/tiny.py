"""Tiny, real backbones for tests and the demo preset: random weights, a tokenizer trained on the spot.

`make_tiny_backbone` writes a complete Hugging Face folder (config, safetensors, tokenizer
with a Qwen-style `<think>` chat template and a pad token) in the same layouts as the hub:
plain causal LM, optionally with native-style `mtp.*` weights, or the Qwen3.5
vision-language layout (`text_config`, `model.language_model.*`, `model.visual.*`).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedConfig, PreTrainedTokenizerFast, Qwen3Config
from transformers import Qwen3_5TextConfig

from pipo.model import backbones

PAD_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, THINK_OPEN, THINK_CLOSE]

# Qwen-style chat template: the assistant turn opens with `<think>\n`, which the
# generation prompt adds itself (so it is part of the prompt, never supervised).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)

ARCHS = ("qwen3_5", "llama", "qwen3")


def default_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Arithmetic and plain-English lines: enough for a byte-level BPE to learn useful merges."""
    rng = random.Random(seed)
    words = "the answer is step compute so we get final result please reason by and put your within boxed".split()
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        lines.append(f"{a} {op} {b} = {eval(f'{a}{op}{b}')}. " + " ".join(rng.choices(words, k=6)) + r" \boxed{" + str(a) + "}")
    return lines


def train_tokenizer(corpus: list[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`, with the chat special tokens and the pad token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, THINK_OPEN, THINK_CLOSE],
        chat_template=CHAT_TEMPLATE,
        model_max_length=8192,
    )


def tiny_text_config(
    arch: str, vocab_size: int, pad_id: int, eos_id: int, hidden_size: int = 64, num_layers: int = 4,
    tie_word_embeddings: bool = True, full_attention_interval: int = 2,
) -> PreTrainedConfig:
    """A small config of each supported family.

    Qwen3.5: every `full_attention_interval`-th layer is full attention, the others gated
    delta nets (the hub models use 4; tests use 2 so two layers hold both kinds).
    """
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )
    if arch == "qwen3_5":
        return Qwen3_5TextConfig(
            **common,
            head_dim=32,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            layer_types=[
                "full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
                for i in range(num_layers)
            ],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [3, 3, 2],
            },
        )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def native_mtp_state(model: torch.nn.Module, config: PreTrainedConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with the native Qwen3.5 `mtp.*` key layout (fc, norms, layers.0)."""
    from pipo.model.heads import MTPHead

    torch.manual_seed(seed + 1)
    backbone = model.model
    head = MTPHead(
        config.hidden_size,
        backbones.norm_factory(backbone, config),
        backbones.build_mtp_layer(backbone, config),
    )
    state = {}
    for key, tensor in head.state_dict().items():
        state[f"mtp.{key}"] = tensor + 0.02 * torch.randn_like(tensor)
    return state


def make_tiny_backbone(
    path: str | Path,
    arch: str = "qwen3_5",
    with_mtp: bool = False,
    hub_layout: bool = False,
    hidden_size: int = 64,
    num_layers: int = 4,
    vocab_size: int = 384,
    tie_word_embeddings: bool = True,
    corpus: list[str] | None = None,
    seed: int = 0,
    full_attention_interval: int = 2,
) -> Path:
    """Write a tiny random backbone checkpoint with a trained tokenizer to `path` and return it.

    `with_mtp` adds native-style `mtp.*` weights; `hub_layout` (Qwen3.5 only) writes the
    hub's vision-language layout, which `PIPOForCausalLM.from_backbone` must accept.
    """
    if hub_layout and arch != "qwen3_5":
        raise ValueError("hub_layout applies to arch='qwen3_5' only")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus or default_corpus(seed=seed), vocab_size)
    config = tiny_text_config(
        arch, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, hidden_size, num_layers,
        tie_word_embeddings, full_attention_interval,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    extra = native_mtp_state(model, config, seed) if with_mtp else {}
    if hub_layout:
        _rewrite_as_vision_language(out, config, extra)
    elif extra:
        add_tensors(out, extra)
    return out


def _weights_file(out: Path) -> Path:
    files = sorted(out.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one safetensors file in {out}, found {len(files)}")
    return files[0]


def add_tensors(out: Path, extra: dict[str, torch.Tensor]) -> None:
    """Add tensors (e.g. native `mtp.*` weights, which `save_pretrained` drops) to a checkpoint's weights file."""
    weights = _weights_file(out)
    state = load_file(str(weights))
    state.update({k: v.contiguous() for k, v in extra.items()})
    save_file(state, str(weights), metadata={"format": "pt"})


def _rewrite_as_vision_language(out: Path, text_config: PreTrainedConfig, extra: dict[str, torch.Tensor]) -> None:
    """Re-key weights to `model.language_model.*`, add a stub vision tower, and write a `qwen3_5` config."""
    weights = _weights_file(out)
    state = load_file(str(weights))
    renamed = {}
    for key, tensor in state.items():
        renamed[key.replace("model.", backbones.VL_TEXT_PREFIX, 1) if key.startswith("model.") else key] = tensor
    renamed["model.visual.patch_embed.proj.weight"] = torch.randn(16, 3, 2, 4, 4)
    renamed["model.visual.merger.linear_fc1.weight"] = torch.randn(16, 16)
    renamed.update({k: v.contiguous() for k, v in extra.items()})
    save_file(renamed, str(weights), metadata={"format": "pt"})
    text = text_config.to_dict()
    for key in ("architectures", "transformers_version", "_name_or_path"):
        text.pop(key, None)
    config = {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": text,
        "vision_config": {"model_type": "qwen3_5_vision", "depth": 1, "hidden_size": 16, "num_heads": 2,
                          "intermediate_size": 32, "out_hidden_size": text_config.hidden_size},
        "tie_word_embeddings": text_config.tie_word_embeddings,
        "image_token_id": 248056,
        "video_token_id": 248057,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
