"""From-scratch pretraining of tiny models on the synthetic arithmetic task (the demo preset).

The demo replaces hub checkpoints by models trained inside the DAG: a byte-level BPE
tokenizer and a random tiny backbone (`pipo.testing.make_tiny_backbone`), then a plain
PyTorch loop (AdamW, warmup + cosine decay) on chat-formatted task documents, so the models
answer under the same chat template that rollouts, SFT and evaluation use. The loss covers
the assistant turn only: the prompt's operands are random, predicting them teaches nothing.

Teacher and student are built from the same corpus, so their tokenizers are identical
(OPD compares distributions token id by token id). A student `with_mtp` gets native-style
`mtp.*` weights after training (random: they exist so the `mtp`/`eagle` baselines run).
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipo.data import synthetic
from pipo.errors import PIPOError
from pipo.model.linear_attention import route_gated_delta_rule

LossLogger = Callable[[int, float], None]


@dataclass(frozen=True)
class PretrainConfig:
    """Model size and training schedule of one demo model."""

    arch: str = "qwen3"
    hidden_size: int = 128
    num_layers: int = 4
    vocab_size: int = 384
    with_mtp: bool = False
    documents: int = 4000  # task documents; also the tokenizer's training corpus
    corpus_seed: int = 0  # keep equal across models that must share a tokenizer
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 10
    task: dict[str, Any] = field(default_factory=dict)  # synthetic.ArithmeticConfig fields (difficulty)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PretrainConfig":
        """Build from a config section; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PIPOError(f"unknown pretrain key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def task_documents(config: PretrainConfig) -> list[list[dict[str, str]]]:
    """Chat conversations (question, step-by-step solution) of the synthetic training split."""
    task = synthetic.ArithmeticConfig(**config.task)
    return [row["messages"] for row in synthetic.sft_rows(config.documents, seed=config.corpus_seed, config=task)]


def encode(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[tuple[list[int], int]]:
    """(token ids, length of the prompt part) per conversation; the prompt part is not supervised."""
    out = []
    for messages in conversations:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        if not full.startswith(prompt):
            raise PIPOError("the chat template renders the prompt differently inside a full conversation")
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        out.append((ids, len(tokenizer(prompt, add_special_tokens=False)["input_ids"])))
    return out


def batch(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def lr_factor(step: int, config: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak rate."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(model: torch.nn.Module, data: list[tuple[list[int], int]], pad_id: int, config: PretrainConfig,
          log: LossLogger | None = None) -> list[float]:
    """The training loop; returns the loss of every step (reshuffling the data each epoch)."""
    route_gated_delta_rule()
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    model.train()
    losses: list[float] = []
    order: list[int] = []
    bar = tqdm(range(config.steps), desc="pretrain", unit="step")
    for step in bar:
        if len(order) < config.batch_size:
            order += torch.randperm(len(data), generator=generator).tolist()
        picked, order = order[: config.batch_size], order[config.batch_size :]
        loss = model(**batch([data[i] for i in picked], pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if log is not None and (step % config.log_every == 0 or step == config.steps - 1):
            log(step + 1, losses[-1])
    model.eval()
    return losses


def pretrain(output_dir: str | Path, config: PretrainConfig, log: LossLogger | None = None) -> list[float]:
    """Build and train one model into `output_dir` (written as `<dir>.partial`, renamed when complete)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipo.testing import add_tensors, make_tiny_backbone, native_mtp_state

    out = Path(output_dir)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    conversations = task_documents(config)
    corpus = [f"{m[0]['content']}\n{m[1]['content']}" for m in conversations]
    make_tiny_backbone(staging, arch=config.arch, hidden_size=config.hidden_size, num_layers=config.num_layers,
                       vocab_size=config.vocab_size, corpus=corpus, seed=config.seed)
    tokenizer = AutoTokenizer.from_pretrained(staging)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)
    losses = train(model, encode(tokenizer, conversations), tokenizer.pad_token_id, config, log)
    model.save_pretrained(staging)
    if config.with_mtp:
        add_tensors(staging, native_mtp_state(model, model.config, config.seed))
    (staging / "pretrain.json").write_text(json.dumps({"config": asdict(config), "losses": losses}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return losses
