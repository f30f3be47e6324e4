"""OPD divergences and confidence targets over a chunked LM head (docs/method.md section 5).

Each divergence is a *row loss*: given one chunk of student logits (float32 [c, V]) it
returns the per-row divergence, differentiable in the logits, and the per-row confidence
target (detached). `chunked_head_loss` runs it chunk by chunk without keeping any
`[c, V]` tensor for backward: the backward pass recomputes each chunk (like activation
checkpointing), so memory stays at one chunk whatever the sequence length.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pipo.errors import PIPOError

# (student logits chunk [c, V] float32, row slice) -> (divergence [c], confidence target [c])
RowLoss = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, row_loss: RowLoss, chunk_size: int):
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            loss[sl], target[sl] = row_loss((hidden[sl] @ weight.t()).float(), sl)
        ctx.save_for_backward(hidden, weight)
        ctx.row_loss, ctx.chunk_size = row_loss, chunk_size
        ctx.mark_non_differentiable(target)
        return loss, target

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_target: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.detach().requires_grad_(need_w)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            with torch.enable_grad():
                h = hidden[sl].detach().requires_grad_(need_h)
                loss, _ = ctx.row_loss((h @ w.t()).float(), sl)
                wanted = [t for t, need in ((h, need_h), (w, need_w)) if need]
                grads = list(torch.autograd.grad(loss, wanted, grad_loss[sl]))
            if need_h:
                grad_h[sl] = grads.pop(0)
            if need_w:
                grad_w += grads.pop(0).float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def chunked_head_loss(
    hidden: torch.Tensor, weight: torch.Tensor, row_loss: RowLoss, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row `(divergence, confidence target)` of `row_loss` on `hidden [N, H] @ weight [V, H]^T`.

    Differentiable in `hidden` and `weight` through the divergence; peak extra memory is
    one chunk's worth of the row loss's `[chunk_size, V]` intermediates.
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return _ChunkedHeadLoss.apply(hidden, weight, row_loss, chunk_size)


def token_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`log softmax(logits)[y]` per row, float32."""
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def acceptance_ratio(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Speculative-sampling acceptance probability of a drafted token: `min(1, p_t(y) / p_s(y))`."""
    return torch.exp(torch.clamp(teacher_logp - student_logp, max=0.0))


def sampled_row_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo reverse KL at the rolled-out token (beta = 1).

    The value is `log p_s(y) - log p_t(y)`. Its gradient is the score-function estimate
    `(log p_s(y) - log p_t(y)) * grad log p_s(y)`, which is unbiased for the reverse KL
    under on-policy samples; differentiating the value directly would only push `p_s(y)`
    down. (docs/method.md section 5: the paper names the estimator, not its gradient;
    this follows its intent, per token, without a sequence-level return.)
    """
    ls = token_logprob(student, targets)
    with torch.no_grad():
        lt = token_logprob(teacher, targets)
    kl = (ls - lt).detach()
    return kl + kl * (ls - ls.detach()), acceptance_ratio(ls.detach(), lt)


def union_indices(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted union of student top-k, teacher top-k and `y` per row: `(indices [c, 2k+1], valid mask)`.

    Duplicates are kept in place but marked invalid, so every row has the same width.
    """
    k = min(k, student.shape[-1])
    candidates = torch.cat([student.topk(k, dim=-1).indices, teacher.topk(k, dim=-1).indices, targets[:, None]], dim=-1)
    indices = candidates.sort(dim=-1).values
    valid = torch.ones_like(indices, dtype=torch.bool)
    valid[:, 1:] = indices[:, 1:] != indices[:, :-1]
    return indices, valid


def topk_row_loss(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact reverse KL over the union of both top-k sets and `y`, renormalised over that union.

    The confidence target uses full-vocabulary probabilities: `min(1, p_t(y) / p_s(y))`.
    """
    with torch.no_grad():
        indices, valid = union_indices(student, teacher, targets, k)
        lt = teacher.gather(-1, indices).masked_fill(~valid, float("-inf")).log_softmax(-1)
        alpha = acceptance_ratio(token_logprob(student, targets), token_logprob(teacher, targets))
    ls = student.gather(-1, indices).masked_fill(~valid, float("-inf")).log_softmax(-1)
    kl = (ls.exp() * (ls - lt).masked_fill(~valid, 0.0)).sum(-1)
    return kl, alpha


def full_row_loss(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary divergence: reverse KL (`beta = 1`), forward KL (`beta = 0`) or generalised JSD.

    JSD follows ms-swift / TRL's GKD: `m = (1 - beta) p_s + beta p_t`,
    `beta KL(p_t || m) + (1 - beta) KL(p_s || m)`. Confidence target: `sum_v min(p_s, p_t)`,
    the probability that speculative sampling accepts a token drafted from `p_s`.
    """
    if not 0 <= beta <= 1:
        raise PIPOError(f"beta must be in [0, 1], got {beta}")
    ls = student.log_softmax(-1)
    with torch.no_grad():
        lt = teacher.log_softmax(-1)
        alpha = torch.minimum(ls.detach().exp(), lt.exp()).sum(-1)
    if beta == 1:
        div = (ls.exp() * (ls - lt)).sum(-1)
    elif beta == 0:
        div = (lt.exp() * (lt - ls)).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), dim=0)
        div = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    return div, alpha


def divergence_row_loss(
    mode: str,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    k: int = 32,
    beta: float = 1.0,
) -> RowLoss:
    """The row loss of one divergence mode; teacher logits are computed per chunk from its hidden rows."""

    def row_loss(student: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher = (teacher_hidden[sl] @ teacher_weight.t()).float()
        if mode == "sampled":
            return sampled_row_loss(student, teacher, targets[sl])
        if mode == "topk":
            return topk_row_loss(student, teacher, targets[sl], k)
        if mode == "full":
            return full_row_loss(student, teacher, beta)
        raise PIPOError(f"unknown divergence {mode!r}: use sampled, topk or full")

    return row_loss
