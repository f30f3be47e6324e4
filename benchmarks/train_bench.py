"""One PIPO SFT step and one OPD step at long context with Qwen3.5-shaped random weights: peak GPU memory, tokens/s.

Runs the trainers' math without ms-swift (the device image has none): the PIPO model with
LoRA (peft, paper recipe) and gradient checkpointing, `pipo_losses` for SFT, and for OPD the
PAD-compacted teacher forward plus `opd_losses`. The rollout itself is not timed (it is the
engine's job). Prints one JSON line per step.

    python benchmarks/train_bench.py --tokens 16384 --steps sft opd
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

from pipo.model.config import PIPOConfig
from pipo.model.linear_attention import route_gated_delta_rule
from pipo.model.modeling import PIPOForCausalLM
from pipo.train.merge import peft_ready
from pipo.train.opd import compact_pads, opd_losses

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODULES_TO_SAVE = ["compressor", "confidence_head", "mtp.fc", "mtp.pre_fc_norm_embedding", "mtp.pre_fc_norm_hidden", "mtp.norm"]
PAD_ID = 248044


def qwen3_5_config(hidden: int, intermediate: int, tied: bool) -> Qwen3_5TextConfig:
    """Qwen3.5 text shape (the hub checkpoints' `text_config`): 32 layers, every 4th full attention, vocab 248,320."""
    return Qwen3_5TextConfig(
        vocab_size=248320, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=32,
        num_attention_heads=16, num_key_value_heads=4, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(32)],
        max_position_embeddings=262144, tie_word_embeddings=tied, pad_token_id=PAD_ID,
    )


def student():
    """A 4B-shaped PIPO student with the paper's LoRA and trainable heads, gradient checkpointing on."""
    config = PIPOConfig(text_config=qwen3_5_config(2560, 9216, True).to_dict(), pad_token_id=PAD_ID)
    with torch.device("cuda"):
        model = PIPOForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, target_modules=LORA_TARGETS, modules_to_save=MODULES_TO_SAVE,
                      task_type="CAUSAL_LM")
    model = get_peft_model(peft_ready(model), lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def teacher():
    """A 9B-shaped regular Qwen3.5 teacher (untied), frozen."""
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(qwen3_5_config(4096, 12288, False), dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def rollout_batch(tokens: int, prompt: int, pad_fraction: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random ids in pair layout: a prompt, then pairs whose second slot is PAD with `pad_fraction`."""
    ids = torch.randint(0, 248000, (1, tokens), generator=generator)
    pads = torch.rand(tokens // 2, generator=generator) < pad_fraction
    ids[0, 1::2][pads] = PAD_ID
    ids[0, 1:prompt:2] = torch.randint(0, 248000, (prompt // 2,), generator=generator)
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[ids == PAD_ID] = -100
    return {"input_ids": ids.cuda(), "labels": labels.cuda(), "attention_mask": torch.ones_like(ids).cuda()}


def timed(step) -> dict[str, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def sft_step(model, optimizer, batch, chunk_size: int) -> None:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], chunk_size=chunk_size)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def opd_step(model, optimizer, teacher_model, batch, compact, divergence: str, chunk_size: int) -> None:
    with torch.no_grad():
        teacher_hidden = teacher_model.model(
            input_ids=compact.input_ids, attention_mask=compact.attention_mask, use_cache=False
        ).last_hidden_state
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_pair_states=True)
    losses = opd_losses(out.hidden_states, out.mtp_hidden_states, out.confidence_logits, model.base_model.model.lm_head.weight,
                        teacher_hidden, teacher_model.lm_head.weight, batch["labels"], compact.source_index,
                        divergence=divergence, chunk_size=chunk_size)
    losses.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def report(name: str, tokens: int, repeats: int, step) -> None:
    for i in range(repeats):
        result = timed(step)
        print(json.dumps({"step": name, "run": i, "tokens": tokens, "tokens_per_s": tokens / result["seconds"], **result}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--steps", nargs="+", default=["sft", "opd"], choices=["sft", "opd"])
    parser.add_argument("--divergence", nargs="+", default=["topk", "full"], choices=["sampled", "topk", "full"])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="the first run includes warm-up (kernel compilation)")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="prompt part of a row (0: min(1024, tokens / 4))")
    args = parser.parse_args()
    prompt = args.prompt_tokens or min(1024, args.tokens // 4 // 2 * 2)
    backend = route_gated_delta_rule()  # as the trainers do: a working gated-delta-rule backward
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gated_delta_backend": backend.name}), flush=True)
    model, optimizer = student()
    if "sft" in args.steps:
        batch = rollout_batch(args.tokens, prompt, 0.0, torch.Generator().manual_seed(0))
        report("sft", args.tokens, args.repeats, lambda: sft_step(model, optimizer, batch, args.chunk_size))
    if "opd" in args.steps:
        teacher_model = teacher()
        batch = rollout_batch(args.tokens, prompt, 0.2, torch.Generator().manual_seed(1))
        compact = compact_pads(batch["input_ids"], batch["attention_mask"], PAD_ID)
        for divergence in args.divergence:
            report(f"opd-{divergence}", args.tokens, args.repeats,
                   lambda: opd_step(model, optimizer, teacher_model, batch, compact, divergence, args.chunk_size))

if __name__ == "__main__":
    main()
