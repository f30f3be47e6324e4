"""Sampling parameters and logits processing shared by the reference generators and the engine."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipo.errors import PIPOError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. `temperature == 0` means greedy (argmax)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    min_p: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PIPOError(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise PIPOError(f"top_k must be an integer, got {self.top_k!r}")
        if self.temperature < 0:
            raise PIPOError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PIPOError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PIPOError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise PIPOError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0)


def apply_presence_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract `penalty` from the logits of every token id that already appeared (`seen`: bool [B, V])."""
    if penalty == 0:
        return logits
    return logits - penalty * seen.to(logits.dtype)


def probabilities(logits: torch.Tensor, params: SamplingParams, banned: torch.Tensor | None = None) -> torch.Tensor:
    """Processed next-token distribution [B, V] (float32): temperature, top-k, top-p, min-p; `banned` ids get 0.

    Greedy returns a one-hot of the argmax, so greedy and sampled paths share one code path.
    """
    logits = logits.float()
    if banned is not None:  # index_fill, not `logits[:, banned] = ...`: that copies a CPU scalar, which CUDA graph capture refuses
        logits = logits.index_fill(-1, banned.to(logits.device), float("-inf"))
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = _softmax(logits)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim from separate max and sum reductions: for a few long rows (one row of
    a 248K vocabulary) these split over many blocks, where `torch.softmax` runs one block per row."""
    e = (logits - logits.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def sample_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    banned: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of raw `logits` [B, V], distributed as `sample(probabilities(...))`.

    Without top-p it stays in logit space: greedy is the argmax; otherwise temperature, top-k
    and min-p (p_i < min_p * p_max  <=>  z_i - z_max < log min_p) are masks on the logits and
    the exponential race argmax(p_i / E_i) is argmax(z_i - log E_i), so no softmax is needed.
    With top-p it goes through `probabilities`. Every op is graph-capturable (no host sync).
    """
    if seen is not None:
        logits = apply_presence_penalty(logits, seen, params.presence_penalty)
    if params.top_p < 1:
        return sample(probabilities(logits, params, banned), generator)
    z = logits.float()
    if banned is not None:
        z = z.index_fill(-1, banned, float("-inf"))
    if params.greedy:
        return z.argmax(-1)
    z = z / params.temperature
    if params.top_k and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.min_p > 0:
        z = z.masked_fill(z < z.amax(-1, keepdim=True) + math.log(params.min_p), float("-inf"))
    noise = torch.empty_like(z).exponential_(generator=generator)
    return (z - noise.log()).argmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `probs` [B, V] (rows sum to 1).

    argmax(p_i / E_i) with E_i ~ Exp(1) i.i.d. picks i with probability p_i (the
    exponential race); it is two elementwise kernels and one argmax, where
    `torch.multinomial` also runs validation reductions over the vocabulary.
    """
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)
