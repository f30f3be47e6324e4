"""Which gated-delta-rule implementation training picks for which versions and GPUs, and the router it installs."""
from __future__ import annotations

import functools
import inspect

import pytest
import torch

from pipo.errors import PIPOError
from pipo.model import linear_attention as la

HOPPER, AMPERE, BLACKWELL = (9, 0), (8, 0), (10, 0)


@pytest.mark.parametrize(
    ("fla", "triton", "capability", "tilelang", "expected"),
    [
        ("0.6.0", "3.6.0", None, False, la.TORCH),  # no GPU
        (None, "3.6.0", HOPPER, False, la.TORCH),  # fla not installed
        ("0.6.0", None, HOPPER, False, la.TORCH),  # no Triton
        ("0.6.0", "3.6.0", HOPPER, False, la.TORCH_FOR_GRADIENTS),  # torch 2.11's Triton on H100/H200: fla refuses
        ("0.6.0", "3.4.0", HOPPER, False, la.TORCH_FOR_GRADIENTS),  # first broken Triton
        ("0.6.0", "3.7.0", HOPPER, False, la.TORCH_FOR_GRADIENTS),  # last broken Triton
        ("0.6.0", "3.6.0", HOPPER, True, la.FLA_TILELANG),  # TileLang takes the kernel over
        ("0.5.0", "3.6.0", HOPPER, True, la.TORCH_FOR_GRADIENTS),  # fla without the TileLang backend
        ("0.6.0", "3.7.1", HOPPER, False, la.FLA),  # fixed Triton
        ("0.6.0", "3.3.1", HOPPER, False, la.FLA),  # before the regression
        ("0.6.0", "3.6.0", AMPERE, False, la.FLA),  # only Hopper is affected
        ("0.6.0", "3.6.0", BLACKWELL, False, la.FLA),
    ],
)
def test_backend_selection(fla, triton, capability, tilelang, expected):
    backend = la.select_gated_delta_backend(fla, triton, capability, tilelang)
    assert backend.name == expected
    assert backend.reason
    if expected == la.TORCH_FOR_GRADIENTS:
        assert "tilelang" in backend.reason and "3.7.1" in backend.reason  # says what to install for speed


def _recorder(name: str, calls: list[str]):
    def implementation(query, key, value, g, beta, **kwargs):
        calls.append(name)
        return query * 2, None

    return implementation


def test_router_sends_gradient_calls_to_the_reference_and_the_rest_to_fla():
    calls: list[str] = []
    route = la.gradient_router(_recorder("fla", calls), _recorder("reference", calls))
    q = torch.ones(1, 2, 1, 4, requires_grad=True)
    route(q, q, q, q, q)
    with torch.no_grad():
        route(q, q, q, q, q)
    frozen = q.detach()
    route(frozen, frozen, frozen, frozen, frozen)
    assert calls == ["reference", "fla", "fla"]
    with pytest.raises(PIPOError, match="cu_seqlens"):
        route(q, q, q, q, q, cu_seqlens=torch.tensor([0, 2]))


def test_route_rebinds_qwen3_5_once_with_a_warning(monkeypatch, backbone_dir):
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_5 import modeling_qwen3_5

    broken = la.GatedDeltaBackend(la.TORCH_FOR_GRADIENTS, "test: fla's backward is unusable")
    monkeypatch.setattr(la, "current_gated_delta_backend", lambda: broken)
    original = modeling_qwen3_5.torch_chunk_gated_delta_rule
    monkeypatch.setattr(modeling_qwen3_5, "torch_chunk_gated_delta_rule", original)
    model = AutoModelForCausalLM.from_pretrained(str(backbone_dir("qwen3_5")))
    ids = torch.randint(0, 300, (1, 24))
    expected = torch.autograd.grad(model(ids, labels=ids).loss, model.lm_head.weight)[0]
    with pytest.warns(UserWarning, match="unusable"):
        assert la.route_gated_delta_rule() == broken
    routed = modeling_qwen3_5.torch_chunk_gated_delta_rule
    assert routed is not original and routed.pipo_routed
    la.route_gated_delta_rule()
    assert modeling_qwen3_5.torch_chunk_gated_delta_rule is routed  # not wrapped twice
    got = torch.autograd.grad(model(ids, labels=ids).loss, model.lm_head.weight)[0]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("routed", [False, True])
def test_engine_cpu_chunk_rule_runs_pytorch_under_the_fla_hub_wrapper(monkeypatch, routed):
    """With fla installed transformers binds a wrapper that calls fla whatever the tensors' device; the engine's
    CPU prefill must still run the plain PyTorch function (found under the wrapper and under our router)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    from pipo.engine import kernels

    bound = modeling_qwen3_5.torch_chunk_gated_delta_rule  # our router when an earlier test routed training
    plain = inspect.unwrap(getattr(bound, "reference", bound))

    @functools.wraps(plain)
    def hub_kernel(*args, **kwargs):
        raise AssertionError("fla's kernel called with CPU tensors")

    bound = la.gradient_router(hub_kernel, plain) if routed else hub_kernel
    monkeypatch.setattr(modeling_qwen3_5, "torch_chunk_gated_delta_rule", bound)
    assert la.torch_gated_delta_rule() is plain
    b, t, h, hv, d = 1, 5, 1, 2, 4
    q, k = torch.randn(b, t, h, d), torch.randn(b, t, h, d)
    v, g, beta = torch.randn(b, t, hv, d), -torch.rand(b, t, hv), torch.rand(b, t, hv)
    chunked, stepped = torch.zeros(b, hv, d, d), torch.zeros(b, hv, d, d)
    out = kernels.chunk_delta_rule(q, k, v, g, beta, chunked)
    expected = kernels.recurrent_delta_rule(q, k, v, g, beta, stepped)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, stepped, atol=1e-5, rtol=1e-5)


def test_packed_chunk_indices_name_each_sequences_chunks():
    """fla's cu_seqlens and chunk indices of a packed prefill, (sequence, chunk within it) per 64-position chunk,
    built on the host: a ragged sequence, one of a single position, one of exactly one chunk."""
    from pipo.engine.kernels import _packed_indices

    cu_seqlens, chunks = _packed_indices((0, 150, 151, 215), torch.device("cpu"))
    assert cu_seqlens.tolist() == [0, 150, 151, 215]
    assert chunks.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [2, 0]]
