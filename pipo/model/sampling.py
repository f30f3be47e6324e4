"""Sampling parameters and logits processing shared by the reference generators and the engine."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

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


# ---------------------------------------------------------------- per-row sampling (the engine)
_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2^32) (products stay below 2^63)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def seed32(seed: int) -> int:
    """A Python int seed (any size) folded to the 32 bits the counter-based noise uses."""
    folded = 0
    seed &= (1 << 128) - 1
    while True:
        folded ^= seed & _MASK32
        seed >>= 32
        if not seed:
            return folded


def derive_seed(seed: int, *index: int) -> int:
    """A child seed for (seed, index...) — e.g. a prompt's seed from the run's, a sample's from the prompt's."""
    x = torch.tensor([seed32(seed)], dtype=torch.long)
    for i in index:
        x = _mix32(x ^ _mix32(torch.tensor([seed32(i) ^ 0x9E3779B9], dtype=torch.long)))
    return int(x)


def row_uniforms(seeds: torch.Tensor, counters: torch.Tensor, salt: int, width: int) -> torch.Tensor:
    """Uniforms in (0, 1) [B, width], a pure function of (row seed, row counter, salt, column).

    Counter-based noise: a sequence's draws depend only on its own seed and position, never on
    which rows it shares a batch with, its slot, or whether it was preempted and recomputed.
    """
    return row_uniforms_at(seeds, counters, salt, torch.arange(width, device=seeds.device, dtype=torch.long)[None])


def row_uniforms_at(seeds: torch.Tensor, counters: torch.Tensor, salt: int, columns: torch.Tensor) -> torch.Tensor:
    """`row_uniforms`'s values at `columns` [B or 1, n] only: a draw over a few candidate ids needs no
    noise over the whole vocabulary, and gets the same values there."""
    key = _mix32(seeds ^ _mix32((counters * 128 + salt) & _MASK32))
    bits = _mix32(key[:, None] ^ _mix32(columns ^ 0x2545F491)) >> 8  # 24 bits: exact in float32, so u never rounds to 1
    return (bits.float() + 0.5) * (1.0 / 16777216.0)


class RowNoise(NamedTuple):
    """Where a batch's rows draw their counter-based noise: their seeds and counters [B], and the draw's salt."""

    seeds: torch.Tensor
    counters: torch.Tensor
    salt: int

    def at(self, columns: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """The rows' uniforms at `columns` [B or 1, n] (`row_uniforms_at`; `fused`: see `compiled`)."""
        return compiled(row_uniforms_at, fused)(self.seeds, self.counters, self.salt, columns)


def compiled(fn: Callable, fused: bool) -> Callable:
    """`fn` through torch.compile when `fused`, else itself. The engine fuses inside CUDA-graph captures only
    (its recurring shapes): there a dozen small kernels become one or two, each of which costs the step
    its few microseconds whatever its size."""
    return _compile(fn) if fused else fn


# compiled variants allowed per function: one per sampling mode, salt, logits dtype and batch-size class;
# past dynamo's default (8) a function would run eagerly, unfused, in every later capture of the process
RECOMPILE_LIMIT = 64


@functools.cache
def _compile(fn: Callable) -> Callable:
    """One torch.compile wrapper per function, so that every engine of the process reuses its variants."""
    fused = torch.compile(fn, dynamic=None)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # torch < 2.7

    def call(*args):
        with torch._dynamo.config.patch(**{limit: RECOMPILE_LIMIT}):
            return fused(*args)

    return call


@dataclass(frozen=True)
class SamplingMode:
    """Which logits transforms a batch's rows need (their per-row values live in tensors): one graph per mode."""

    greedy: bool = True  # every row greedy
    penalty: bool = False
    top_k: int = 0  # the largest top-k over the rows, rounded up to a power of two; 0: none
    top_p: bool = False
    min_p: bool = False
    top_k_all: bool = False  # every sampled row has a top-k: top-p then needs only the top-k values, no sort


    @staticmethod
    def of(params: "list[SamplingParams]") -> "SamplingMode":
        top_k = max((p.top_k for p in params if not p.greedy), default=0)
        return SamplingMode(
            greedy=all(p.greedy for p in params),
            penalty=any(p.presence_penalty != 0 for p in params),
            top_k=1 << (top_k - 1).bit_length() if top_k else 0,
            top_p=any(p.top_p < 1 and not p.greedy for p in params),
            min_p=any(p.min_p > 0 and not p.greedy for p in params),
            top_k_all=all(p.top_k > 0 for p in params if not p.greedy),
        )


@dataclass
class RowParams:
    """Per-row sampling parameters as device tensors [rows] (views of the engine's slot buffers)."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    presence: torch.Tensor

    def __getitem__(self, rows: slice) -> "RowParams":
        return RowParams(self.temperature[rows], self.top_p[rows], self.top_k[rows], self.min_p[rows],
                         self.presence[rows])


def _adjusted(
    logits: torch.Tensor, params: RowParams, mode: SamplingMode, banned: torch.Tensor | None, seen: torch.Tensor | None
) -> torch.Tensor:
    """Logits after the presence penalty (then float) and with banned ids at -inf (else in their dtype)."""
    z = logits
    if mode.penalty and seen is not None:
        z = z.float() - params.presence[:, None] * seen.float()
    if banned is not None:
        z = z.index_fill(-1, banned, float("-inf"))
    return z


def _temperature(temperature: torch.Tensor) -> torch.Tensor:
    """Per-row divisor [B, 1]: the temperature, 1 for greedy rows (their argmax is taken before)."""
    return torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]


def row_logits(
    logits: torch.Tensor, params: RowParams, mode: SamplingMode, banned: torch.Tensor | None, seen: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(processed logits with excluded ids at -inf, greedy argmax) for raw `logits` [B, V], rule per row.

    Same order as `probabilities`: presence penalty, banned ids, temperature, top-k, top-p, min-p;
    masking logits and renormalising probabilities define the same distribution.
    """
    z = _adjusted(logits, params, mode, banned, seen)
    greedy = z.argmax(-1)
    if mode.greedy:
        return z, greedy
    z = z.float() / _temperature(params.temperature)
    if mode.top_k:
        k = min(mode.top_k, z.shape[-1])
        values = top_k(z, k)[0]
        kth = values.gather(1, (params.top_k.clamp(1, k) - 1)[:, None])
        z = z.masked_fill((params.top_k > 0)[:, None] & (z < kth), float("-inf"))
        if mode.top_p and mode.top_k_all:  # the nucleus lies inside the top-k values (sorted already)
            values = values.masked_fill(torch.arange(k, device=z.device)[None] >= params.top_k[:, None],
                                        float("-inf"))
            z = z.masked_fill(z < _nucleus_floor(values, params.top_p), float("-inf"))
            mode = SamplingMode(mode.greedy, mode.penalty, mode.top_k, False, mode.min_p, mode.top_k_all)
    if mode.top_p:
        probs = _softmax(z)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p[:, None]
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    if mode.min_p:
        z = _min_p(z, params.min_p)
    return z, greedy


# candidates up to which `top_k`'s second stage sorts them instead of torch.topk's radix select (H200, 256 rows
# x 4,096 candidates: 29 vs 49 us in a graph; larger counts are not measured)
SORT_CANDIDATES = 4096
# logits per group in `top_k`'s prefilter (H200, 256 x 248K bf16 logits, k = 32: 292 us; groups of 64: 418 us, 32: 675 us)
TOP_K_GROUP = 128


def top_k(z: torch.Tensor, k: int, group: int | None = None, with_argmax: bool = False) -> tuple[torch.Tensor, ...]:
    """`torch.topk(z, k, dim=-1)` for rows `z` [B, V]: the k largest values, sorted descending, and their ids;
    `with_argmax` adds `z.argmax(-1)` (the greedy token), derived from the prefilter's group maxima instead of
    another read of the logits.

    Why: torch.topk over a 248K vocabulary at 256 rows takes ~7x an argmax. On GPU it runs a
    prefilter instead: the max of each group of `group` consecutive logits (`group_max`, one read),
    the k groups with the largest maxima, then the top k of those groups' k * group logits.
    Every top-k element lies in such a group (a group left out has k groups whose maxima are at
    least its own), so the values are torch.topk's; among equal values the ids may differ, which
    torch.topk does not define either. `group` forces a group size (0: plain torch.topk); by
    default the prefilter runs on CUDA when a row holds at least 8 * k groups, so CPU results are
    torch.topk's (and torch.argmax's) bit for bit.
    """
    width = z.shape[-1]
    if group is None:
        group = TOP_K_GROUP if z.is_cuda and width >= 8 * k * TOP_K_GROUP else 0
    if not group or -(-width // group) <= k:
        values, ids = torch.topk(z, k, dim=-1)
        return (values, ids, z.argmax(-1)) if with_argmax else (values, ids)
    from pipo.model.group_max import group_max  # lazily: it imports Triton

    maxima = group_max(z, group)
    values, ids = _top_k_of_groups(z, k, group, maxima)
    return (values, ids, _argmax_of_groups(z, group, maxima)) if with_argmax else (values, ids)


def _top_k_of_groups(z: torch.Tensor, k: int, group: int, maxima: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_k`'s result from the group maxima [B, G] (G > k): the top k of the k best groups' logits.

    A ragged last group's slots past the vocabulary take the ids at the same offsets in the
    (k+1)-th best group instead: real ids outside the chosen groups, whose logits are at most
    every chosen group's maximum, so the values stay torch.topk's and the ids distinct and < V.
    """
    width = z.shape[-1]
    best = torch.topk(maxima, k + 1, dim=-1).indices  # sorted: the last is a group no chosen one is below
    offsets = torch.arange(group, device=z.device)
    columns = best[:, :k, None] * group + offsets
    if width % group:
        columns = torch.where(columns < width, columns, best[:, k:, None] * group + offsets)
    columns = columns.flatten(1)
    candidates = z.gather(1, columns)
    if candidates.shape[-1] <= SORT_CANDIDATES:
        values, picked = candidates.sort(dim=-1, descending=True)
        values, picked = values[:, :k], picked[:, :k]
    else:
        values, picked = torch.topk(candidates, k, dim=-1)
    return values, columns.gather(1, picked)


def _argmax_of_groups(z: torch.Tensor, group: int, maxima: torch.Tensor) -> torch.Tensor:
    """`z.argmax(-1)` exactly from the group maxima [B, G]: the first group holding the row's maximum
    (argmax returns the first), then the first maximum inside it. A ragged last group's slots past the
    vocabulary repeat its last logit, which comes before them, so they never win; NaN propagates through
    the maxima, and argmax takes it as the largest value in both steps, as on the whole row."""
    first = maxima.argmax(-1, keepdim=True)
    columns = (first * group + torch.arange(group, device=z.device)).clamp_max(z.shape[-1] - 1)
    return first[:, 0] * group + z.gather(1, columns).argmax(-1)


def _nucleus_floor(values: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The smallest value [B, 1] of each row's nucleus (mass before it < top_p), from values sorted descending."""
    probs = _softmax(values)
    keep = ((probs.cumsum(-1) - probs) < top_p[:, None]).sum(-1, keepdim=True).clamp_min(1)
    return values.gather(1, keep - 1)


def _min_p(z: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """`z` with ids below min_p x the row's most likely one at -inf (rows with min_p 0 untouched)."""
    floor = z.amax(-1, keepdim=True) + min_p.clamp_min(1e-30).log()[:, None]
    return z.masked_fill((min_p > 0)[:, None] & (z < floor), float("-inf"))


def sample_rows(
    logits: torch.Tensor,
    params: RowParams,
    mode: SamplingMode,
    noise: RowNoise | None,
    banned: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """One token per row of raw `logits` [B, V] with per-row parameters, drawn with the rows' counter-based
    `noise` (None when every row is greedy); `fused`: the elementwise stretches run compiled (`compiled`),
    which draws from the same distribution, the same tokens up to float rounding (Triton's exp and scan
    order on GPU can move a top-p cut by one candidate).

    The exponential race argmax(z - log E), E = -log U, picks i with probability softmax(z)_i.
    When every sampled row has a top-k, the race runs over the `mode.top_k` largest logits
    only: ids outside them are masked anyway, and the noise of an id does not depend on
    which ids are drawn, so the token is the one the whole-vocabulary race picks (up to ties
    with the k-th logit beyond those candidates, which are dropped).
    """
    if mode.greedy:
        return row_logits(logits, params, mode, banned, seen)[1]
    if mode.top_k and mode.top_k_all:
        z = _adjusted(logits, params, mode, banned, seen)
        values, columns, greedy = top_k(z, min(mode.top_k, z.shape[-1]), with_argmax=True)
        return compiled(_race_top_k, fused)(values, columns, greedy, params.temperature, params.top_k, params.top_p,
                                            params.min_p, noise, mode.top_p, mode.min_p)
    z, greedy = row_logits(logits, params, mode, banned, seen)
    columns = torch.arange(z.shape[-1], device=z.device)[None]
    token = (z - (-noise.at(columns, fused).log()).log()).argmax(-1)
    return torch.where(params.temperature > 0, token, greedy)


def _race_top_k(
    values: torch.Tensor, columns: torch.Tensor, greedy: torch.Tensor, temperature: torch.Tensor,
    row_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, noise: RowNoise, use_top_p: bool, use_min_p: bool,
) -> torch.Tensor:
    """`sample_rows`'s draw when every sampled row has a top-k (`row_k` [B]): the transforms after the top-k
    run on the candidates (`values` sorted descending, their ids `columns` [B, k]); `greedy` [B] is the argmax."""
    k = values.shape[-1]
    values = values.float() / _temperature(temperature)
    kth = values.gather(1, (row_k.clamp(1, k) - 1)[:, None])
    values = values.masked_fill(values < kth, float("-inf"))
    if use_top_p:
        values = values.masked_fill(values < _nucleus_floor(values, top_p), float("-inf"))
    if use_min_p:
        values = _min_p(values, min_p)
    pick = (values - (-noise.at(columns).log()).log()).argmax(-1, keepdim=True)
    return torch.where(temperature > 0, columns.gather(1, pick)[:, 0], greedy)


def row_probabilities(
    logits: torch.Tensor, params: RowParams, mode: SamplingMode, banned: torch.Tensor | None, seen: torch.Tensor | None
) -> torch.Tensor:
    """Processed distributions [B, V] (float32) with per-row parameters; greedy rows are one-hot argmaxes."""
    z, greedy = row_logits(logits, params, mode, banned, seen)
    hot = torch.nn.functional.one_hot(greedy, z.shape[-1]).float()
    if mode.greedy:
        return hot
    return torch.where((params.temperature > 0)[:, None], _softmax(z), hot)


def sample_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One id per row of `probs` [B, V] by the exponential race with counter-based `uniforms` [B, V]."""
    return (probs / -uniforms.log()).argmax(-1)


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None, residual_uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling: target probs `p` [B, k+1, V], draft probs `q` [B, k, V], drafts [B, k].

    Draft i is kept with probability min(1, p_i(d)/q_i(d)) while all before it were; the
    first rejection resamples from norm(max(p - q, 0)), and if all k survive a bonus token
    comes from p_k. The emitted tokens are then distributed exactly as sampling from `p`.
    Returns (accepted count a [B], next token [B]). Draws come from `uniforms` [B, k] and
    `residual_uniforms` [B, V] (counter-based) when given, else from `generator`.
    """
    batch, k = drafts.shape
    pd = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    qd = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = uniforms if uniforms is not None else torch.rand(qd.shape, generator=generator, device=qd.device)
    accepted = (u * qd < pd).int().cumprod(-1).sum(-1)
    rows = torch.arange(batch, device=p.device)
    target = p[rows, accepted]
    q_at = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, accepted]
    residual = (target - q_at).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target)
    if residual_uniforms is not None:
        return accepted, sample_probs(residual, residual_uniforms)
    return accepted, sample(residual, generator)
