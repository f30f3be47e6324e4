"""Pair layout rules (docs/method.md section 3) and PAD augmentation invariants (section 4)."""
from __future__ import annotations

import pytest
import torch

from pipo.errors import PadTokenError, ShapeError
from pipo.model.pairs import (
    IGNORE_INDEX,
    build_pair_sample,
    check_pad_positions,
    mask_thinking_prefix,
    pad_augment_batch,
    pad_augment_row,
    pad_to_even,
)

PAD = 0


def sample_batch(seed=0, rows=4):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(rows):
        p = int(torch.randint(1, 12, (1,), generator=gen))
        r = int(torch.randint(4, 40, (1,), generator=gen))
        samples.append(build_pair_sample(torch.randint(5, 99, (p,), generator=gen).tolist(),
                                         torch.randint(5, 99, (r,), generator=gen).tolist(), PAD))
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((rows, width), PAD)
    labels = torch.full((rows, width), IGNORE_INDEX)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
        mask[i, : len(s.input_ids)] = 1
    return samples, ids, labels, mask


@pytest.mark.parametrize("prompt_len,response_len", [(1, 1), (3, 4), (4, 3), (4, 4), (7, 10)])
def test_build_pair_sample_layout(prompt_len, response_len):
    s = build_pair_sample(list(range(10, 10 + prompt_len)), list(range(50, 50 + response_len)), PAD)
    assert len(s.input_ids) % 2 == 0 and s.prompt_length % 2 == 0
    assert all(t != PAD for t in s.input_ids[0::2])
    assert s.labels[: s.prompt_length] == [IGNORE_INDEX] * s.prompt_length
    assert [t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE_INDEX] == list(range(50, 50 + response_len))
    assert all(lab == IGNORE_INDEX for t, lab in zip(s.input_ids, s.labels) if t == PAD)


def test_build_pair_sample_rejects_bad_input():
    with pytest.raises(ShapeError, match="empty prompt"):
        build_pair_sample([], [1, 2], PAD)
    with pytest.raises(PadTokenError, match="pad token"):
        build_pair_sample([5], [6, PAD], PAD)


def test_pad_augmentation_invariants():
    samples, ids, labels, mask = sample_batch()
    gen = torch.Generator().manual_seed(7)
    new_ids, new_labels, new_mask, ratio = pad_augment_batch(ids, labels, mask, PAD, 0.25, gen)
    assert 0 <= ratio <= 0.25
    for row, s in enumerate(samples):
        n = int(new_mask[row].sum())
        row_ids, row_labels = new_ids[row, :n].tolist(), new_labels[row, :n].tolist()
        assert n % 2 == 0
        assert all(t != PAD for t in row_ids[0::2]), "PAD in a first slot"
        assert all(lab == IGNORE_INDEX for t, lab in zip(row_ids, row_labels) if t == PAD), "PAD supervised"
        # the prompt is untouched, so the boundary stays on a pair boundary
        assert row_ids[: s.prompt_length] == s.input_ids[: s.prompt_length]
        # supervised tokens and their order survive
        kept = [lab for lab in row_labels if lab != IGNORE_INDEX]
        assert kept == [lab for lab in s.labels if lab != IGNORE_INDEX]
        assert [t for t in row_ids if t != PAD] == [t for t in s.input_ids if t != PAD]
    check_pad_positions(new_ids, PAD, new_mask)


def test_pad_augmentation_is_seeded():
    _, ids, labels, mask = sample_batch(1)
    a = pad_augment_batch(ids, labels, mask, PAD, 0.5, torch.Generator().manual_seed(3))
    b = pad_augment_batch(ids, labels, mask, PAD, 0.5, torch.Generator().manual_seed(3))
    c = pad_augment_batch(ids, labels, mask, PAD, 0.5, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    assert not torch.equal(a[0], c[0]) or a[3] != c[3]


def test_pad_augmentation_ratio_in_expectation():
    response = list(range(100, 300))
    s = build_pair_sample([1, 2], response, PAD)
    candidates = len(response) // 2
    gen = torch.Generator().manual_seed(0)
    fractions = []
    for _ in range(400):
        ids, _ = pad_augment_row(s.input_ids, s.labels, PAD, 0.2, gen)
        fractions.append(((len(ids) - len(s.input_ids)) // 2) / candidates)
    mean = sum(fractions) / len(fractions)
    assert abs(mean - 0.2) < 0.01, mean  # std of the mean ~ sqrt(.2*.8/100/400) = 0.002
    # the batch-level draw r ~ U[0, max] averages to max / 2
    _, ids, labels, mask = sample_batch(2)
    ratios = [pad_augment_batch(ids, labels, mask, PAD, 0.25, gen)[3] for _ in range(2000)]
    assert abs(sum(ratios) / len(ratios) - 0.125) < 0.006


def test_pad_to_even_and_pad_position_check():
    ids = torch.tensor([[5, 6, 7]])
    labels = torch.tensor([[5, 6, 7]])
    mask = torch.ones_like(ids)
    e_ids, e_labels, e_mask = pad_to_even(ids, PAD, labels, mask)
    assert e_ids.tolist() == [[5, 6, 7, PAD]] and e_labels.tolist() == [[5, 6, 7, IGNORE_INDEX]]
    assert e_mask.tolist() == [[1, 1, 1, 1]]
    with pytest.raises(PadTokenError, match="even position 2 of row 0"):
        check_pad_positions(torch.tensor([[5, 6, PAD, 7]]), PAD)
    check_pad_positions(torch.tensor([[5, 6, PAD, PAD]]), PAD, torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(ShapeError):
        pad_to_even(torch.tensor([1, 2, 3]), PAD)


def test_mask_thinking_prefix():
    think, newline = 3, 4
    labels = torch.tensor([[-100, -100, think, newline, 9, 10], [-100, think, 8, 9, 10, 11]])
    out = mask_thinking_prefix(labels, [think, newline])
    assert out.tolist() == [[-100, -100, -100, -100, 9, 10], [-100, think, 8, 9, 10, 11]]
