"""On-policy distillation math (docs/method.md section 5): PAD compaction for the teacher and the OPD losses.

The teacher never sees PADs: `compact_pads` removes them, the teacher runs on the clean
sequence, and `source_index` maps every student position back to the teacher position of
the last real token at or before it (a PAD position takes the previous real token's
distribution). The student side is the compressed PIPO forward (`PIPOForCausalLM.pair_states`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipo.model.losses import LossTerms, assemble_losses
from pipo.model.pairs import REJECTED_DRAFT
from pipo.train.divergences import chunked_head_loss, divergence_row_loss


@dataclass
class CompactBatch:
    """A batch with PADs removed, and the way back to the original positions."""

    input_ids: torch.Tensor  # [B, Lc] real tokens first, right-padded with PAD
    attention_mask: torch.Tensor  # [B, Lc]
    source_index: torch.Tensor  # [B, L]: compact index of the last real token at or before each position


def compact_pads(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int) -> CompactBatch:
    """Remove PADs (and right padding) from each row, keeping the order of the real tokens."""
    real = attention_mask.bool() & (input_ids != pad_id)
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    width = max(int(real.sum(1).max()), 1)
    kept = real.gather(1, order)[:, :width]
    compact = input_ids.gather(1, order)[:, :width].masked_fill(~kept, pad_id)
    source_index = (real.long().cumsum(1) - 1).clamp(min=0)
    return CompactBatch(compact, kept.long(), source_index)


def teacher_rows_for_targets(
    teacher_hidden: torch.Tensor, source_index: torch.Tensor, target_positions: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Teacher hidden rows that predict the tokens at `target_positions` [B, n] (rows where `mask`).

    The token at position t is predicted from position t-1, mapped through `source_index`.
    """
    compact_pos = source_index.gather(1, target_positions - 1)
    batch = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    return teacher_hidden[batch[mask], compact_pos[mask]]


@torch.no_grad()
def top_tokens(rows: torch.Tensor, weight: torch.Tensor, chunk_size: int, banned: int | None = None) -> torch.Tensor:
    """Argmax token of `rows [N, H] @ weight [V, H]^T` other than `banned`, chunk by chunk (no `[N, V]` tensor)."""
    out = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
    for start in range(0, rows.shape[0], chunk_size):
        logits = rows[start : start + chunk_size] @ weight.t()
        if banned is not None:
            logits[:, banned] = float("-inf")
        out[start : start + chunk_size] = logits.argmax(-1)
    return out


def fill_rejected_drafts(
    targets: torch.Tensor, mtp_rows: torch.Tensor, weight: torch.Tensor, chunk_size: int, pad_id: int | None = None
) -> torch.Tensor:
    """Token2 targets with every `REJECTED_DRAFT` replaced by the student MTP head's own top token.

    As in the original implementation: where the confidence head rejected a draft, the MTP
    head is still distilled (toward the teacher, at its own best guess) and the confidence
    head learns from a draft it failed on; otherwise both only see drafts already kept.
    `targets` [B, n] token2 labels, `mtp_rows` [B, n, H] the MTP hidden states predicting them;
    the top token is never `pad_id` (decoding never drafts PAD).
    """
    rejected = targets == REJECTED_DRAFT
    if not bool(rejected.any()):
        return targets
    filled = targets.clone()
    filled[rejected] = top_tokens(mtp_rows[rejected].detach(), weight.detach(), chunk_size, pad_id)
    return filled


def opd_losses(
    hidden: torch.Tensor,
    mtp_hidden: torch.Tensor,
    conf_logits: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    source_index: torch.Tensor,
    divergence: str = "topk",
    k: int = 32,
    beta: float = 1.0,
    mtp_weight: float = 1.0,
    conf_weight: float = 1.0,
    chunk_size: int = 1024,
    fill_rejected: bool = True,
    pad_id: int | None = None,
) -> LossTerms:
    """Total `L_backbone + w_mtp L_mtp + w_conf L_conf` on a rollout batch.

    `hidden` / `mtp_hidden` / `conf_logits`: the student's `pair_states` for pairs 0..L-2
    ([B, L/2-1, ...]); `teacher_hidden` [B, Lc, Ht]: the teacher's final hidden states on the
    compacted batch; `labels` [B, L]: rollout tokens, prompt ignored, rejected drafts
    `REJECTED_DRAFT`. Backbone rows are token1 positions (2i+2), MTP rows token2 positions
    (2i+3); only supervised tokens count, plus (`fill_rejected`) the rejected drafts, whose
    target is the student's top token (`fill_rejected_drafts`).
    """
    n_pairs = hidden.shape[1]
    device = labels.device
    token1_pos = torch.arange(n_pairs, device=device) * 2 + 2
    parts = []
    for rows, positions in ((hidden, token1_pos), (mtp_hidden, token1_pos + 1)):
        positions = positions[None].expand(labels.shape[0], -1)
        targets = labels.gather(1, positions)
        if fill_rejected and rows is mtp_hidden:
            targets = fill_rejected_drafts(targets, rows, student_weight, chunk_size, pad_id)
        mask = targets >= 0  # IGNORE_INDEX and unfilled REJECTED_DRAFT are no targets
        teacher = teacher_rows_for_targets(teacher_hidden, source_index, positions, mask)
        row_loss = divergence_row_loss(divergence, teacher, teacher_weight, targets[mask], k, beta)
        div, alpha = chunked_head_loss(rows[mask], student_weight, row_loss, chunk_size)
        parts.append((div, alpha, mask))
    (div1, _, _), (div2, alpha2, mask2) = parts
    return assemble_losses(div1, div2, conf_logits[mask2], alpha2, backbone_like=hidden, mtp_like=mtp_hidden,
                           mtp_weight=mtp_weight, conf_weight=conf_weight)
