"""Memory-safe LM-head losses and the loss assembly SFT and OPD share (docs/method.md sections 4-5).

`chunked_token_nll` computes `-log softmax(h W^T)[y]` chunk by chunk in the forward
pass and recomputes each chunk's logits in the backward pass (the same trade as
activation checkpointing), so peak memory is `chunk_size x V` whatever the sequence length.
`assemble_losses` turns per-row backbone / MTP losses and confidence logits and targets
into `L_backbone + w_mtp L_mtp + w_conf L_conf` and its diagnostics, for both stages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from pipo.model.pairs import IGNORE_INDEX


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """Softmax/CE run in float32 at least (bf16 logits lose the tail), float64 when given float64."""
    return torch.promote_types(x.dtype, torch.float32)


class _ChunkedTokenNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        acc = _accumulation_dtype(hidden)
        nll = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            logits = (hidden[sl] @ weight.t()).to(acc)
            nll[sl] = torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[sl, None]).squeeze(-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size = chunk_size
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = _accumulation_dtype(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            logits = (hidden[sl] @ weight.t()).to(acc)
            dlogits = torch.softmax(logits, dim=-1)
            dlogits.scatter_add_(-1, targets[sl, None], torch.full_like(dlogits[:, :1], -1.0))
            dlogits *= grad_nll[sl, None]
            if need_h:
                grad_h[sl] = (dlogits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += dlogits.t() @ hidden[sl].to(acc)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def chunked_token_nll(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 2048
) -> torch.Tensor:
    """Per-row negative log-likelihood of `targets` under `softmax(hidden @ weight.T)` (float32 or wider).

    `hidden` [N, H], `weight` [V, H], `targets` [N] (all valid ids). Differentiable in
    `hidden` and `weight`; peak extra memory is one `[chunk_size, V]` block.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return _ChunkedTokenNLL.apply(hidden, weight, targets, chunk_size)


def reference_token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Unchunked `F.cross_entropy` over full logits: the oracle `chunked_token_nll` is tested against."""
    return F.cross_entropy((hidden @ weight.t()).to(_accumulation_dtype(hidden)), targets, reduction="none")


def select_supervised(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of `hidden` [B, n, H] whose label [B, n] is supervised: (rows [N, H], targets [N], mask [B, n])."""
    mask = labels != IGNORE_INDEX
    return hidden[mask], labels[mask], mask


def mean_or_zero(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Mean that stays differentiable and equals 0 for an empty batch (no supervised tokens)."""
    if values.numel() == 0:
        return like.sum() * 0.0
    return values.mean()


@dataclass
class LossTerms:
    """A training loss, its components and confidence-head diagnostics (SFT and OPD alike)."""

    loss: torch.Tensor
    backbone_loss: torch.Tensor
    mtp_loss: torch.Tensor
    conf_loss: torch.Tensor
    conf_mean_pred: torch.Tensor
    conf_mean_target: torch.Tensor
    num_backbone_tokens: int
    num_mtp_tokens: int


def assemble_losses(
    backbone: torch.Tensor,
    mtp: torch.Tensor,
    conf_logits: torch.Tensor,
    conf_target: torch.Tensor,
    *,
    backbone_like: torch.Tensor,
    mtp_like: torch.Tensor,
    mtp_weight: float,
    conf_weight: float,
) -> LossTerms:
    """`L_backbone + w_mtp L_mtp + w_conf L_conf` from per-row losses (docs/method.md section 4).

    `backbone` [N1] / `mtp` [N2]: per-row losses of the token1 / token2 rows; `conf_logits` [N2]
    the confidence logits of the token2 rows and `conf_target` [N2] their (detached) targets.
    `backbone_like` / `mtp_like` keep an empty term in the autograd graph of the tensors it
    would have come from (see `mean_or_zero`).
    """
    conf_logits = conf_logits.float()
    conf_bce = F.binary_cross_entropy_with_logits(conf_logits, conf_target.detach(), reduction="none")
    backbone_loss = mean_or_zero(backbone, backbone_like)
    mtp_loss = mean_or_zero(mtp, mtp_like)
    conf_loss = mean_or_zero(conf_bce, conf_logits)
    return LossTerms(
        loss=backbone_loss + mtp_weight * mtp_loss + conf_weight * conf_loss,
        backbone_loss=backbone_loss,
        mtp_loss=mtp_loss,
        conf_loss=conf_loss,
        conf_mean_pred=mean_or_zero(torch.sigmoid(conf_logits.detach()), conf_logits).detach(),
        conf_mean_target=mean_or_zero(conf_target, conf_logits).detach(),
        num_backbone_tokens=int(backbone.numel()),
        num_mtp_tokens=int(mtp.numel()),
    )
