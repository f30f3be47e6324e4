"""OPD rollouts with PIPO decoding: batched through one `pipo.engine.Engine` kept across training steps.

The engine decodes an in-memory `PIPOForCausalLM` (PEFT LoRA layers and `modules_to_save`
wrappers included): its layer-by-layer forward calls the model's own modules (`q_proj`,
the compressor, the heads ...), so eager work reads whatever tensor each parameter holds at
call time, and its CUDA graphs (on by default on GPU) read the tensors that were bound when
they were captured. `RolloutEngine` keeps one engine per trainer so that the graphs are
captured once, not per rollout batch, and binds the same tensors at every rollout:

- a parameter or buffer already in the engine's dtype and device is decoded from the
  training tensor itself: the optimizer's in-place updates are what the next rollout sees,
  at no memory cost (a bf16 DeepSpeed model: every parameter);
- any other (PEFT's fp32 LoRA on a bf16 base, DeepSpeed's fp32 rotary buffers, or a
  parameter whose storage the trainer replaced) gets an engine-side copy made once and
  refreshed in place from the training tensor before each rollout;
- during a rollout the model's parameters and buffers point at those tensors; afterwards
  every parameter, gradient and buffer is put back exactly as it was (`tensors_restored`).

The engine's KV pool is sized for the rollout batch (every sequence at full length, never a
share of the GPU the trainer is using) and stays allocated between rollouts: the graphs
point into it. No torch.compile by default: a training run decodes few batches, and the
graphs already remove the launch overhead compilation would save.

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

LENGTH_STEP = 2048  # an engine's max_seq_len is rounded up to this: later batches with longer prompts reuse it


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


class RolloutEngine:
    """One `Engine` over a training model, reused by every rollout of a run (module docstring).

    Built at the first rollout and rebuilt only when a batch needs more rows or a longer
    sequence than it holds, or another model, threshold or EOS set. `builds` counts engines
    built; `kv_bytes` is what the current one's KV pool holds.
    """

    def __init__(self, compile_layers: bool = False) -> None:
        self.compile_layers = compile_layers
        self.engine: Engine | None = None
        self.key: tuple | None = None  # what the engine was built for: model, dtype, device, threshold, EOS ids
        self.tensors: dict = {}  # parameter, or (module, buffer name) -> the tensor the engine reads
        self.builds = 0

    @property
    def kv_bytes(self) -> int:
        if self.engine is None:
            return 0
        decoder = self.engine.decoder
        stacks = [decoder.backbone] + ([decoder.mtp] if decoder.mtp is not None else [])
        return sum(t.numel() * t.element_size() for stack in stacks for s in stack.states for t in (s.k, s.v)
                   if t is not None)

    def _bind(self, model: PIPOForCausalLM, dtype: torch.dtype, device: torch.device) -> None:
        """Point every parameter and buffer at the engine's tensor for it, refreshed from the training tensor."""
        holders = [(p, p.data) for p in model.parameters()]
        holders += [((m, name), b) for m in model.modules() for name, b in m._buffers.items()
                    if b is not None and b.is_floating_point()]
        for holder, current in holders:
            bound = self.tensors.get(holder)
            if bound is None:
                bound = current if (current.dtype, current.device) == (dtype, device) else current.to(device, dtype)
                self.tensors[holder] = bound
            elif bound.data_ptr() != current.data_ptr():
                bound.copy_(current)
            if isinstance(holder, tuple):
                holder[0]._buffers[holder[1]] = bound
            else:
                holder.data = bound

    def _engine_for(self, model: PIPOForCausalLM, batch: int, max_seq_len: int, key: tuple) -> Engine:
        """The current engine if it fits this batch, else a new one (the old one's caches and graphs freed first)."""
        engine = self.engine
        if engine is not None and key == self.key and engine.max_batch_size >= batch and engine.max_seq_len >= max_seq_len:
            return engine
        if engine is not None and key == self.key:  # grow, never shrink: batches alternate
            batch, max_seq_len = max(batch, engine.max_batch_size), max(max_seq_len, engine.max_seq_len)
        engine = self.engine = None  # the last references: the old KV pool and graphs go before the new ones come
        _, dtype, device, conf_threshold, eos_token_ids = key
        if device.type == "cuda":
            torch.cuda.empty_cache()
        max_seq_len = -(-max_seq_len // LENGTH_STEP) * LENGTH_STEP
        self.engine = Engine(
            model,
            "pipo",
            device=device,
            dtype=dtype,
            max_batch_size=batch,
            max_seq_len=max_seq_len,
            conf_threshold=conf_threshold,
            eos_token_ids=list(eos_token_ids),
            prefix_cache_size=0,  # each prompt is decoded once: snapshots of its state would only cost memory
            num_blocks=Engine.blocks_for("pipo", max_seq_len, batch),  # every rollout at full length
            compile_layers=self.compile_layers,
            fuse_projections=False,  # `_bind` rebinds each parameter's tensor: views of a fused weight would go stale
        )
        self.key = key
        self.builds += 1
        return self.engine

    def rollouts(
        self,
        model: PIPOForCausalLM,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: SamplingParams,
        conf_threshold: float,
        eos_token_ids: Sequence[int],
        seed: int,
    ) -> list[Rollout]:
        """All prompts in one engine batch, decoded from the model's current weights; the model is left as it was."""
        weight = model.get_input_embeddings().weight
        key = (id(model), weight.dtype, weight.device, conf_threshold, tuple(eos_token_ids))
        if self.key is not None and key[:3] != self.key[:3]:
            self.engine, self.tensors = None, {}
        need = max(len(p) + len(p) % 2 for p in prompts) + 2 * max_new_tokens
        with tensors_restored(model):
            self._bind(model, weight.dtype, weight.device)
            engine = self._engine_for(model, len(prompts), need, key)
            engine.prefix_cache.clear()  # cached prompts hold the previous weights' KV and linear states
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
    engine: RolloutEngine | None = None,
) -> list[Rollout]:
    """PIPO-decode every prompt (confidence-gated token2); `raw_ids` keep the PADs the student emitted.

    Through `engine` (a trainer keeps one across steps), else a one-off `RolloutEngine`; the
    reference loop where the engine cannot serve the model. Runs in eval mode (no dropout,
    caches enabled under gradient checkpointing) and restores the previous mode afterwards.
    """
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    try:
        if engine_unsupported(model) is not None:
            return reference_rollouts(model, prompts, max_new_tokens, params, conf_threshold, eos_token_ids, seed)
        engine = engine or RolloutEngine()
        return engine.rollouts(model, prompts, max_new_tokens, params, conf_threshold, eos_token_ids, seed)
    finally:
        model.train(was_training)
