"""Pair layout of encoded training rows (spec section 3), shared by the templates and the OPD trainer.

ms-swift templates encode a conversation into `input_ids` / `labels`; `pair_layout` then
moves every supervised segment onto a pair boundary (a PAD closes an odd-length context)
and pads the row to even length, so the pairs PIPO trains on are the pairs it decodes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pipo.data.pairs import IGNORE_INDEX
from pipo.errors import PadTokenError, ShapeError

# Label of a rollout's rejected draft (a PAD the student emitted as token2): unsupervised for
# the backbone; OPD may give the MTP head a target there (`opd_losses(fill_rejected=True)`).
REJECTED_DRAFT = -101


def pair_layout(input_ids: Sequence[int], labels: Sequence[int], pad_id: int) -> tuple[list[int], list[int]]:
    """Insert a PAD before each supervised segment that would start at an odd position; pad to even.

    The inserted PADs fall at odd positions (second slot of a pair) and are unsupervised;
    a supervised PAD is an error because PAD is never a training target.
    """
    if len(input_ids) != len(labels):
        raise ShapeError(f"{len(input_ids)} input ids but {len(labels)} labels")
    ids: list[int] = []
    out_labels: list[int] = []
    previous_supervised = False
    for token, label in zip(input_ids, labels):
        supervised = label != IGNORE_INDEX
        if supervised and token == pad_id:
            raise PadTokenError(f"the response contains the pad token {pad_id} at position {len(ids)}; PAD is never supervised")
        if supervised and not previous_supervised and len(ids) % 2:
            ids.append(pad_id)
            out_labels.append(IGNORE_INDEX)
        ids.append(token)
        out_labels.append(label)
        previous_supervised = supervised
    if len(ids) % 2:
        ids.append(pad_id)
        out_labels.append(IGNORE_INDEX)
    return ids, out_labels


def even_prompt(prompt_ids: Sequence[int], pad_id: int) -> list[int]:
    """A generation prompt padded to even length, so decoding starts on a pair boundary."""
    if not prompt_ids:
        raise ShapeError("empty prompt: a PIPO sequence needs at least one prompt token")
    return list(prompt_ids) + ([pad_id] if len(prompt_ids) % 2 else [])


def rollout_row(prompt_ids: Sequence[int], raw_ids: Sequence[int], pad_id: int) -> tuple[list[int], list[int]]:
    """A PIPO rollout as a training row: even prompt + every emitted slot (PADs included).

    Rollout PADs stay in the input (the student saw them) and are labelled `REJECTED_DRAFT`
    (never a token target); the PAD that evens out a finished rollout is `IGNORE_INDEX`.
    """
    prompt = even_prompt(prompt_ids, pad_id)
    ids = prompt + list(raw_ids)
    labels = [IGNORE_INDEX] * len(prompt) + [REJECTED_DRAFT if t == pad_id else t for t in raw_ids]
    if len(ids) % 2:
        ids.append(pad_id)
        labels.append(IGNORE_INDEX)
    return ids, labels


def collate_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `(input_ids, labels)` rows into a batch with an attention mask."""
    if not rows:
        raise ShapeError("cannot collate an empty batch")
    width = max(len(ids) for ids, _ in rows)
    width += width % 2
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        labels[row, : len(lab)] = torch.tensor(list(lab), dtype=torch.long)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
