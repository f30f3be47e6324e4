"""From-scratch pretraining of tiny models on the synthetic arithmetic task (the demo preset).

The demo replaces hub checkpoints by models trained inside the DAG: a byte-level BPE
tokenizer and a random tiny backbone (`pipo.model.tiny.make_tiny_backbone`), then a plain
PyTorch loop (AdamW, warmup + cosine decay) on chat-formatted task documents, so the models
answer under the same chat template that rollouts, SFT and evaluation use. The loss covers
the assistant turn only: the prompt's operands are random, predicting them teaches nothing.

Teacher and student are built from the same corpus, so their tokenizers are identical
(OPD compares distributions token id by token id). A model `with_mtp` trains a native MTP
head alongside, as Qwen3.5's own: at position t the extra layer reads the final hidden
state h_t and the embedding of the next token x_{t+1} and predicts x_{t+2}
(`L = L_lm + mtp_weight * L_mtp`, both means over supervised tokens, the MTP loss also
shaping the backbone). Its weights are saved under the hub's `mtp.*` keys, so the `mtp`
and `eagle` baselines draft with a trained head and PIPO's MTP head starts from it.
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

from torch import nn
from torch.nn import functional as F

from pipo.data import synthetic
from pipo.errors import PIPOError
from pipo.model.heads import MTPHead
from pipo.model.linear_attention import route_gated_delta_rule
from pipo.model.pairs import IGNORE_INDEX

LossLogger = Callable[[dict[str, float], int], None]  # (metrics, step), as MLflow runs log them


@dataclass(frozen=True)
class PretrainConfig:
    """Model size and training schedule of one demo model."""

    arch: str = "qwen3"
    hidden_size: int = 128
    num_layers: int = 4
    full_attention_interval: int = 4  # Qwen3.5: every 4th layer full attention, the rest gated delta nets
    vocab_size: int = 384
    with_mtp: bool = False
    mtp_weight: float = 0.5  # weight of the native MTP loss (with_mtp only)
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


@dataclass
class PretrainLosses:
    """Total loss and its parts (the MTP part is zero without a head)."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor


def new_mtp_head(model: nn.Module) -> MTPHead:
    """A native-layout MTP head (fc, norms, one full-attention layer) initialised like the backbone."""
    from pipo.model import backbones

    head = MTPHead(
        model.config.hidden_size,
        backbones.norm_factory(model.model, model.config),
        backbones.build_mtp_layer(model.model, model.config),
    )
    head.apply(model._init_weights)
    return head


def shifted_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over supervised targets (`IGNORE_INDEX` skipped); zero when none is supervised."""
    flat = targets.reshape(-1)
    if not bool((flat != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE_INDEX)


def pretrain_losses(
    model: nn.Module, mtp: MTPHead | None, batch: dict[str, torch.Tensor], mtp_weight: float
) -> PretrainLosses:
    """Next-token loss, plus (with a head) the native MTP loss: (x_{t+1}, h_t) at position t predicts x_{t+2}."""
    from pipo.model.backbones import mtp_layer_config
    from pipo.model.modeling import run_mtp_head

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    lm_loss = shifted_ce(model.lm_head(hidden[:, :-1]), labels[:, 1:])
    if mtp is None:
        return PretrainLosses(lm_loss, lm_loss, lm_loss.detach() * 0.0)
    m = run_mtp_head(mtp, model.model, mtp_layer_config(model.config), ids[:, 1:], hidden[:, :-1], mask[:, :-1])
    mtp_loss = shifted_ce(model.lm_head(m[:, :-1]), labels[:, 2:])
    return PretrainLosses(lm_loss + mtp_weight * mtp_loss, lm_loss, mtp_loss)


def train(model: nn.Module, data: list[tuple[list[int], int]], pad_id: int, config: PretrainConfig,
          log: LossLogger | None = None, mtp: MTPHead | None = None) -> list[float]:
    """The training loop (backbone and, when given, the MTP head); returns every step's total loss."""
    route_gated_delta_rule()
    generator = torch.Generator().manual_seed(config.seed)
    params = list(model.parameters()) + (list(mtp.parameters()) if mtp is not None else [])
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    modules = [m for m in (model, mtp) if m is not None]
    for module in modules:
        module.train()
    losses: list[float] = []
    order: list[int] = []
    bar = tqdm(range(config.steps), desc="pretrain", unit="step")
    for step in bar:
        if len(order) < config.batch_size:
            order += torch.randperm(len(data), generator=generator).tolist()
        picked, order = order[: config.batch_size], order[config.batch_size :]
        out = pretrain_losses(model, mtp, batch([data[i] for i in picked], pad_id), config.mtp_weight)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        bar.set_postfix(lm=f"{out.lm_loss.item():.3f}", mtp=f"{out.mtp_loss.item():.3f}")
        if log is not None and (step % config.log_every == 0 or step == config.steps - 1):
            log({"loss": losses[-1], "lm_loss": out.lm_loss.item(), "mtp_loss": out.mtp_loss.item()}, step + 1)
    for module in modules:
        module.eval()
    return losses


def pretrain(output_dir: str | Path, config: PretrainConfig, log: LossLogger | None = None) -> list[float]:
    """Build and train one model into `output_dir` (written as `<dir>.partial`, renamed when complete)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipo.model.tiny import add_tensors, make_tiny_backbone

    out = Path(output_dir)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    conversations = task_documents(config)
    corpus = [f"{m[0]['content']}\n{m[1]['content']}" for m in conversations]
    make_tiny_backbone(staging, arch=config.arch, hidden_size=config.hidden_size, num_layers=config.num_layers,
                       vocab_size=config.vocab_size, corpus=corpus, seed=config.seed,
                       full_attention_interval=config.full_attention_interval)
    tokenizer = AutoTokenizer.from_pretrained(staging)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)
    mtp = new_mtp_head(model) if config.with_mtp else None
    losses = train(model, encode(tokenizer, conversations), tokenizer.pad_token_id, config, log, mtp)
    model.save_pretrained(staging)
    if mtp is not None:
        add_tensors(staging, {f"mtp.{key}": tensor.detach() for key, tensor in mtp.state_dict().items()})
    (staging / "pretrain.json").write_text(json.dumps({"config": asdict(config), "losses": losses}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return losses
