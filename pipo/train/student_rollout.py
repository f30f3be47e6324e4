"""OPD rollouts with PIPO decoding: batched through `pipo.engine`, the reference loop where the engine cannot serve.

The engine decodes an in-memory `PIPOForCausalLM` (PEFT LoRA layers and `modules_to_save`
wrappers included: it calls the model's own projection modules) and equals the reference
generator token for token under greedy decoding. Two adaptations keep it safe on a model
that is being trained (`pipo.engine` offers neither, see `engine_rollouts`):

- the engine casts and moves the parts it is handed to one dtype and device *in place*;
  a trainer's model may hold fp32 LoRA weights on a bf16 base (PEFT's autocast) and fp32
  rotary buffers (DeepSpeed keeps buffers in fp32), so every parameter, gradient and
  buffer is put back exactly as it was;
- the engine is built per rollout batch and decodes *before* that restore: its CUDA
  graphs (on by default on GPU) capture the cast tensors, which must stay bound and
  alive while the graphs replay. Where nothing needed a cast (a bf16 DeepSpeed model's
  parameters), the cast tensors are the training tensors themselves and cost no memory.

The reference loop (`pipo.model.reference`, one prompt at a time) remains for a model
spread over several devices: the engine would move it onto one device.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pipo.engine import Engine
from pipo.model.modeling import PIPOForCausalLM
from pipo.model.reference import generate_pipo_reference
from pipo.model.sampling import SamplingParams


@dataclass
class Rollout:
    """One rollout: visible tokens, every emitted slot (PADs of rejected drafts included), EOS reached."""

    token_ids: list[int]
    raw_ids: list[int]
    finished: bool


def engine_unsupported(model: nn.Module) -> str | None:
    """Why the engine cannot decode this model (None when it can)."""
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        return f"the model is spread over {sorted(map(str, devices))}; the engine moves every part onto one device"
    return None


@contextmanager
def tensors_restored(model: nn.Module) -> Iterator[None]:
    """Undo in-place dtype/device conversions of `model`'s parameters, their gradients and buffers.

    `Module.to` rebinds `param.data` (and `param.grad.data`) and replaces buffers, so the
    original tensors survive, as do the parameter objects the optimizer holds, and are put
    back bit for bit (gradients matter: rollouts run between accumulation micro-steps).
    """
    params = [(p, p.data, None if p.grad is None else p.grad.data) for p in model.parameters()]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    try:
        yield
    finally:
        for param, data, grad in params:
            param.data = data
            if grad is not None:
                param.grad.data = grad
        for module, name, buffer in buffers:
            module._buffers[name] = buffer


def engine_rollouts(
    model: PIPOForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams,
    conf_threshold: float,
    eos_token_ids: Sequence[int],
    seed: int,
) -> list[Rollout]:
    """All prompts in one engine batch; the cache holds the longest prompt plus a completion of all-PAD pairs.

    No prefix cache: each prompt is decoded once, so snapshots of its prompt state would
    only cost memory.

    What the engine should offer so this adapter can go: `dtype=None` (keep an in-memory
    model's dtypes and devices untouched) and a way to reuse one engine, with its CUDA
    graphs, across training steps.
    """
    weight = model.get_input_embeddings().weight
    longest = max(len(p) + len(p) % 2 for p in prompts)
    max_seq_len = longest + 2 * max_new_tokens
    with tensors_restored(model):
        engine = Engine(
            model,
            "pipo",
            device=weight.device,
            dtype=weight.dtype,
            max_batch_size=len(prompts),
            max_seq_len=max_seq_len,
            conf_threshold=conf_threshold,
            eos_token_ids=eos_token_ids,
            prefix_cache_size=0,
            # KV blocks for every rollout at full length, not a share of the GPU the trainer is using
            num_blocks=Engine.blocks_for("pipo", max_seq_len, len(prompts)),
        )
        completions = engine.generate([list(p) for p in prompts], params, max_new_tokens=max_new_tokens, seed=seed)
    return [Rollout(c.token_ids, c.raw_ids, c.finish_reason == "eos") for (c,) in completions]


def reference_rollouts(
    model: PIPOForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams,
    conf_threshold: float,
    eos_token_ids: Sequence[int],
    seed: int,
) -> list[Rollout]:
    """One prompt at a time through the reference PIPO generator (any model layout, slow)."""
    generator = torch.Generator(model.device).manual_seed(seed)
    results = [
        generate_pipo_reference(model, prompt, max_new_tokens, params, conf_threshold, eos_token_ids, generator)
        for prompt in prompts
    ]
    return [Rollout(r.token_ids, r.raw_ids, r.finished) for r in results]


@torch.no_grad()
def generate_rollouts(
    model: PIPOForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams,
    conf_threshold: float,
    eos_token_ids: Sequence[int],
    seed: int,
) -> list[Rollout]:
    """PIPO-decode every prompt (confidence-gated token2); `raw_ids` keep the PADs the student emitted.

    Runs in eval mode (no dropout, caches enabled under gradient checkpointing) and restores
    the previous mode afterwards.
    """
    if not prompts:
        return []
    generate = engine_rollouts if engine_unsupported(model) is None else reference_rollouts
    was_training = model.training
    model.eval()
    try:
        return generate(model, prompts, max_new_tokens, params, conf_threshold, eos_token_ids, seed)
    finally:
        model.train(was_training)
