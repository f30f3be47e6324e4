"""The pair layout every PIPO sequence obeys (docs/method.md section 3), from raw ids to training rows, and PAD
augmentation (section 4).

- Every sequence has even length; a PAD is appended where needed.
- A PAD only ever sits in the second slot of a pair (odd position) and is never supervised.
- The prompt is padded to even length, so the prompt/response boundary is a pair boundary.

Training rows: ms-swift templates encode a conversation into `input_ids` / `labels`;
`pair_layout` then moves every supervised segment onto a pair boundary (a PAD closes an
odd-length context) and pads the row to even length, so the pairs PIPO trains on are the
pairs it decodes; `rollout_row` lays out an OPD rollout, `collate_rows` batches rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipo.errors import PadTokenError, ShapeError

IGNORE_INDEX = -100  # label of positions that are not supervised (HF convention)
# Label of a rollout's rejected draft (a PAD the student emitted as token2): unsupervised for
# the backbone; OPD may give the MTP head a target there (`opd_losses(fill_rejected=True)`).
REJECTED_DRAFT = -101


@dataclass(frozen=True)
class PairSample:
    """One tokenized training sequence in pair layout."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # even: where the response starts


def build_pair_sample(prompt_ids: Sequence[int], response_ids: Sequence[int], pad_id: int) -> PairSample:
    """Lay out prompt + response: prompt padded to even, response supervised, total padded to even.

    `prompt_ids` should be the chat template's generation prompt, i.e. it already ends
    with the tokens the template adds to the assistant turn itself (Qwen3.5: `<think>\\n`),
    so training pairs line up exactly with the pairs the model meets at inference.
    """
    if not prompt_ids:
        raise ShapeError("empty prompt: a PIPO sequence needs at least one prompt token")
    prompt = list(prompt_ids) + ([pad_id] if len(prompt_ids) % 2 else [])
    response = list(response_ids)
    if pad_id in response:
        raise PadTokenError(f"the response contains the pad token {pad_id}; PAD is never supervised")
    ids = prompt + response
    labels = [IGNORE_INDEX] * len(prompt) + response
    if len(ids) % 2:
        ids.append(pad_id)
        labels.append(IGNORE_INDEX)
    return PairSample(ids, labels, len(prompt))


def mask_thinking_prefix(labels: torch.Tensor, prefix_ids: Sequence[int]) -> torch.Tensor:
    """Unsupervise the template-added start of the assistant turn (e.g. `<think>\\n`).

    For data encoded with the prefix inside the supervised response: in each row, if the
    first supervised tokens equal `prefix_ids`, their labels become IGNORE_INDEX.
    """
    out = labels.clone()
    n = len(prefix_ids)
    if n == 0:
        return out
    prefix = torch.as_tensor(list(prefix_ids), dtype=labels.dtype, device=labels.device)
    for row in range(labels.shape[0]):
        supervised = (labels[row] != IGNORE_INDEX).nonzero()
        if supervised.numel() == 0:
            continue
        start = int(supervised[0])
        if torch.equal(labels[row, start : start + n], prefix):
            out[row, start : start + n] = IGNORE_INDEX
    return out


def pad_to_even(
    input_ids: torch.Tensor,
    pad_id: int,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Append one PAD column to an odd-length batch (label ignored, mask copied from the last token)."""
    if input_ids.dim() != 2:
        raise ShapeError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] % 2 == 0:
        return input_ids, labels, attention_mask
    input_ids = torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], 1), pad_id)], dim=1)
    if labels is not None:
        labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask[:, -1:]], dim=1)
    return input_ids, labels, attention_mask


def check_pad_positions(input_ids: torch.Tensor, pad_id: int, attention_mask: torch.Tensor | None = None) -> None:
    """Raise if an attended PAD sits in the first slot of a pair (an even position)."""
    first_slot = input_ids[:, 0::2] == pad_id
    if attention_mask is not None:
        first_slot &= attention_mask[:, 0::2].bool()
    if bool(first_slot.any()):
        row, pair = (int(v) for v in first_slot.nonzero()[0])
        raise PadTokenError(
            f"PAD (id {pad_id}) at even position {2 * pair} of row {row}: PADs may only fill the second slot of a pair"
        )


def pad_augment_row(
    input_ids: Sequence[int], labels: Sequence[int], pad_id: int, ratio: float, generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """Split a fraction `ratio` (in expectation) of the response pairs `(a, b)` into `(a, PAD), (b, PAD)`.

    A pair is a candidate when neither token is PAD and at least one is supervised, so
    prompt pairs and already-padded pairs are never touched; PAD labels are ignored.
    """
    if len(input_ids) % 2 or len(labels) != len(input_ids):
        raise ShapeError(f"pad augmentation needs an even-length row with one label per token, got {len(input_ids)} ids")
    n_pairs = len(input_ids) // 2
    draws = torch.rand(n_pairs, generator=generator).tolist()
    out_ids: list[int] = []
    out_labels: list[int] = []
    for p in range(n_pairs):
        a, b = input_ids[2 * p], input_ids[2 * p + 1]
        la, lb = labels[2 * p], labels[2 * p + 1]
        candidate = a != pad_id and b != pad_id and (la != IGNORE_INDEX or lb != IGNORE_INDEX)
        if candidate and draws[p] < ratio:
            out_ids += [a, pad_id, b, pad_id]
            out_labels += [la, IGNORE_INDEX, lb, IGNORE_INDEX]
        else:
            out_ids += [a, b]
            out_labels += [la, lb]
    return out_ids, out_labels


def pad_augment_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    pad_id: int,
    max_pad_ratio: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """PAD augmentation for one training step: draw `r ~ U[0, max_pad_ratio]`, split pairs in every row.

    Rows are right-padded again (padding uses PAD with mask 0 and ignored labels).
    Returns the new `(input_ids, labels, attention_mask, r)`; seeded through `generator`.
    """
    ratio = float(torch.rand((), generator=generator)) * max_pad_ratio
    rows = []
    for row in range(input_ids.shape[0]):
        length = int(attention_mask[row].sum())
        ids = input_ids[row, :length].tolist()
        lab = labels[row, :length].tolist()
        if length % 2:
            ids.append(pad_id)
            lab.append(IGNORE_INDEX)
        rows.append(pad_augment_row(ids, lab, pad_id, ratio, generator))
    width = max(len(ids) for ids, _ in rows)
    new_ids = input_ids.new_full((len(rows), width), pad_id)
    new_labels = labels.new_full((len(rows), width), IGNORE_INDEX)
    new_mask = attention_mask.new_zeros((len(rows), width))
    for row, (ids, lab) in enumerate(rows):
        new_ids[row, : len(ids)] = torch.tensor(ids, dtype=input_ids.dtype)
        new_labels[row, : len(lab)] = torch.tensor(lab, dtype=labels.dtype)
        new_mask[row, : len(ids)] = 1
    return new_ids, new_labels, new_mask, ratio


# ------------------------------------------------------------------ training rows


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
