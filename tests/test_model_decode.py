"""Incremental pair-by-pair decoding must reproduce one full compressed forward (docs/method.md section 6)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import FAMILIES

TOL = 1e-5


def full_forward(model, ids):
    hidden = model.encode_pairs(ids)
    mtp_hidden = model.mtp_forward(ids[:, 2::2], hidden[:, :-1])
    return (
        model.token_logits(hidden),
        model.token_logits(mtp_hidden),
        model.confidence_logits(hidden[:, :-1], mtp_hidden),
    )


def incremental_forward(model, ids, prefill_pairs):
    cache = model.new_cache()
    hidden = model.encode_pairs(ids[:, : 2 * prefill_pairs], cache=cache.backbone)
    mtp_hidden = model.mtp_forward(ids[:, 2 : 2 * prefill_pairs : 2], hidden[:, :-1], cache=cache.mtp)
    hs, ms = [hidden], [mtp_hidden]
    for pair in range(prefill_pairs, ids.shape[1] // 2):
        h_prev = hs[-1][:, -1:]
        # token1 of the next pair drives the MTP step of the previous position, as in decoding
        ms.append(model.mtp_forward(ids[:, 2 * pair : 2 * pair + 1], h_prev, cache=cache.mtp))
        hs.append(model.encode_pairs(ids[:, 2 * pair : 2 * pair + 2], cache=cache.backbone))
    hidden, mtp_hidden = torch.cat(hs, 1), torch.cat(ms, 1)
    return (
        model.token_logits(hidden),
        model.token_logits(mtp_hidden),
        model.confidence_logits(hidden[:, :-1], mtp_hidden),
    )


def random_sequence(model, batch, length, with_pads, seed):
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(5, vocab, (batch, length), generator=gen)
    if with_pads:
        odd = torch.arange(1, length, 2)
        chosen = odd[torch.rand(len(odd), generator=gen) < 0.4]
        ids[:, chosen] = model.pad_token_id
    return ids


@pytest.mark.parametrize("arch", FAMILIES + ("qwen3",))
@pytest.mark.parametrize("with_pads", [False, True])
@pytest.mark.parametrize("compressor_type", ["mlp", "linear"])
def test_incremental_decode_matches_full_forward(pipo_model, arch, with_pads, compressor_type):
    model = pipo_model(arch, compressor_type, with_mtp=arch == "qwen3_5")
    # perturb the heads so the test does not rely on their special initialisations
    with torch.no_grad():
        for p in list(model.compressor.parameters()) + list(model.mtp.fc.parameters()):
            p.add_(0.01 * torch.randn_like(p))
    ids = random_sequence(model, batch=2, length=40, with_pads=with_pads, seed=1)
    with torch.no_grad():
        full = full_forward(model, ids)
        for prefill_pairs in (1, 7):
            inc = incremental_forward(model, ids, prefill_pairs)
            for name, a, b in zip(("token1", "token2", "confidence"), full, inc):
                assert a.shape == b.shape, name
                err = (a - b).abs().max().item()
                assert err < TOL, f"{name} logits differ by {err} (prefill {prefill_pairs} pairs)"


def test_backbone_sees_half_the_positions(pipo_model):
    model = pipo_model("llama")
    cache = model.new_cache()
    ids = random_sequence(model, 1, 16, False, 0)
    model.encode_pairs(ids, cache=cache.backbone)
    assert cache.backbone.get_seq_length() == 8
    model.encode_pairs(ids[:, :2], cache=cache.backbone)
    assert cache.backbone.get_seq_length() == 9  # one entry per pair
