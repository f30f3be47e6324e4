"""The initialisations of the PIPO heads (docs/method.md section 2), and their values on arbitrary weights,
worked out position by position."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from pipo.model.heads import Compressor, ConfidenceHead


def test_linear_compressor_starts_as_sum():
    torch.manual_seed(0)
    comp = Compressor(8, "linear")
    e_a, e_b = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    z = comp(torch.cat([e_a, e_b], -1))
    assert torch.equal(z, e_a + e_b) or torch.allclose(z, e_a + e_b, atol=0, rtol=1e-6)
    assert torch.count_nonzero(comp.proj.bias) == 0


def test_mlp_compressor_identity_then_pair_sum():
    torch.manual_seed(0)
    comp = Compressor(8, "mlp")
    assert torch.equal(comp.up.weight, torch.eye(16))
    assert torch.equal(comp.proj.weight, torch.cat([torch.eye(8), torch.eye(8)], 1))
    e_a, e_b = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    z = comp(torch.cat([e_a, e_b], -1))
    torch.testing.assert_close(z, F.silu(e_a) + F.silu(e_b), rtol=1e-6, atol=0)


def test_compressor_init_in_a_built_model(pipo_model):
    model = pipo_model("llama", "linear")
    ids = torch.tensor([[7, 9, 11, 13]])
    emb = model.model.embed_tokens(ids)
    torch.testing.assert_close(model.compress(ids), (emb[:, 0::2] + emb[:, 1::2]), rtol=1e-6, atol=0)


def test_confidence_head_shapes():
    head = ConfidenceHead(8)
    out = head(torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    assert out.shape == (2, 3)
    assert head.fc1.bias is None and head.fc2.bias is None


def test_confidence_head_values_by_hand():
    """`RMSNorm(2H) -> fc1 -> SiLU -> fc2` on `[h ; m]`, written out position by position."""
    gen = torch.Generator().manual_seed(0)
    head = ConfidenceHead(4, eps=1e-6)
    with torch.no_grad():
        for param in head.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    hidden, mtp = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    got = head(hidden, mtp).tolist()
    norm, fc1, fc2 = head.norm.weight.tolist(), head.fc1.weight.tolist(), head.fc2.weight[0].tolist()
    for b in range(2):
        for i in range(3):
            x = hidden[b, i].tolist() + mtp[b, i].tolist()
            rms = (sum(v * v for v in x) / len(x) + 1e-6) ** 0.5
            x = [v / rms * w for v, w in zip(x, norm)]
            inner = [sum(w * v for w, v in zip(row, x)) for row in fc1]
            inner = [v / (1 + math.exp(-v)) for v in inner]
            expected = sum(w * v for w, v in zip(fc2, inner))
            assert got[b][i] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_trained_compressors_by_hand():
    """Both compressors on arbitrary weights, pair by pair: linear `W [e_a ; e_b] + b`, mlp `W2 silu(W1 . + b1) + b2`."""
    gen = torch.Generator().manual_seed(1)
    pairs = torch.randn(1, 2, 6, generator=gen)
    for kind in ("linear", "mlp"):
        comp = Compressor(3, kind)
        with torch.no_grad():
            for param in comp.parameters():
                param.copy_(torch.randn(param.shape, generator=gen))
        got = comp(pairs)
        for i in range(2):
            x = pairs[0, i]
            if kind == "mlp":
                x = F.silu(comp.up.weight @ x + comp.up.bias)
            torch.testing.assert_close(got[0, i], comp.proj.weight @ x + comp.proj.bias, rtol=1e-5, atol=1e-6)
