"""GPU-only checks, opt-in: `python -m pytest -m gpu -q tests/` (skipped where CUDA is not available).

The Triton flash-decode kernel against SDPA at real head sizes in bf16, CUDA-graph decoding
against eager decoding on the same GPU (regular and PIPO, greedy and sampled), and
flash-linear-attention's gated delta rule and our decode-step kernel against the PyTorch path the CPU runs,
the sampler's group-max kernel and prefiltered top-k against torch.
"""
from __future__ import annotations

import pytest
import torch

from pipo.engine import Engine
from pipo.model.sampling import GREEDY, SamplingParams

pytestmark = pytest.mark.gpu

EOS = [2]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(30, 90)), [100], [40, 41, 42, 43]]
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, min_p=0.01, presence_penalty=1.5)


@pytest.mark.parametrize(
    ("batch", "kv_heads", "group", "steps", "d", "block_size"),
    [(1, 4, 4, 1, 128, 32), (8, 2, 8, 4, 256, 64), (33, 8, 2, 2, 64, 16)],  # batch 1 / eagle-like / many rows
)
def test_flash_decode_matches_sdpa(batch, kv_heads, group, steps, d, block_size):
    from pipo.engine import flash_decode

    torch.manual_seed(0)
    max_blocks, pool_blocks = 12, 8 + 12 * batch
    q = torch.randn(batch, kv_heads, group * steps, d, device="cuda", dtype=torch.bfloat16)
    assert flash_decode.available(q, block_size), "the Triton kernel does not apply: is triton installed?"
    pool_k, pool_v = torch.randn(2, pool_blocks, kv_heads, block_size, d, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(pool_blocks - 1, device="cuda")[: batch * max_blocks].view(batch, max_blocks) + 1
    capacity = max_blocks * block_size
    last = torch.randint(steps - 1, capacity, (batch,), device="cuda")
    last[0] = capacity - 1  # one row reaches the table's last key
    positions = last[:, None] - torch.arange(steps - 1, -1, -1, device="cuda")
    out = flash_decode.paged_decode_attention(q, pool_k, pool_v, tables, positions, d**-0.5)
    keys = pool_k[tables].transpose(1, 2).reshape(batch, kv_heads, capacity, d).float()
    values = pool_v[tables].transpose(1, 2).reshape(batch, kv_heads, capacity, d).float()
    mask = (torch.arange(capacity, device="cuda")[None, None] <= positions[:, :, None])[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), keys, values, attn_mask=mask.repeat(1, 1, group, 1), scale=d**-0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2,
                               msg=lambda m: f"flash-decode vs SDPA, batch {batch}, steps {steps}, d {d}: {m}")


@pytest.mark.parametrize("method", ["regular", "pipo"])
def test_cuda_graph_decode_equals_eager(decode_target, method):
    """Same raw ids with and without CUDA graphs (greedy, then sampled: a mode change captures new graphs);
    fp32 and no torch.compile, so the two paths run the same kernels apart from the graphs."""
    target = decode_target(method)
    kw = dict(device="cuda", dtype=torch.float32, compile_layers=False, max_batch_size=4, max_seq_len=128,
              eos_token_ids=EOS, num_blocks=Engine.blocks_for(method, 128, 4))  # not 90% of the GPU per engine
    eager = Engine(target, method, cuda_graphs=False, **kw)
    graphed = Engine(target, method, cuda_graphs=True, **kw)
    for params in (GREEDY, SAMPLED):
        expected = [c[0].raw_ids for c in eager.generate(PROMPTS, params, max_new_tokens=24, seed=3)]
        got = [c[0].raw_ids for c in graphed.generate(PROMPTS, params, max_new_tokens=24, seed=3)]
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g == e, f"{method} {params}: prompt {i} graphed {g} != eager {e}"


def _delta_inputs(batch: int, steps: int, heads: int, v_heads: int, dk: int, dv: int):
    """Random gated-delta-rule inputs in bf16 (as the engine runs them) on the GPU, and an fp32 initial state."""
    q, k = torch.randn(2, batch, steps, heads, dk, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, steps, v_heads, dv, device="cuda", dtype=torch.bfloat16)
    g = -torch.nn.functional.softplus(torch.randn(batch, steps, v_heads, device="cuda")).to(torch.bfloat16)
    beta = torch.rand(batch, steps, v_heads, device="cuda", dtype=torch.bfloat16)
    state = 0.1 * torch.randn(batch, v_heads, dk, dv, device="cuda")
    return q, k, v, g, beta, state


@pytest.mark.parametrize("record", [False, True])
def test_fla_recurrent_delta_rule_matches_torch(record):
    pytest.importorskip("fla")
    from pipo.engine import kernels

    assert kernels.fla_ops() is not None, "fla is installed but its gated delta rule kernels do not import"
    torch.manual_seed(0)
    q, k, v, g, beta, state = _delta_inputs(3, 4, 2, 4, 128, 128)  # 4 steps: eagle's k+1 verification
    cpu = [t.to("cpu", copy=True) for t in (q, k, v, g, beta)]
    ref_state = state.to("cpu", copy=True)
    ref_steps = torch.zeros(4, *state.shape) if record else None
    steps_out = torch.zeros(4, *state.shape, device="cuda") if record else None
    out = kernels.recurrent_delta_rule(q, k, v, g, beta, state, steps_out)  # fla, in place
    expected = kernels.recurrent_delta_rule(*cpu, ref_state, ref_steps)  # PyTorch
    torch.testing.assert_close(out.float().cpu(), expected.float(), atol=2e-2, rtol=2e-2, msg="fla output")
    torch.testing.assert_close(state.cpu(), ref_state, atol=2e-3, rtol=2e-3, msg="fla final state")
    if record:
        torch.testing.assert_close(steps_out.cpu(), ref_steps, atol=2e-3, rtol=2e-3, msg="fla per-step states")


def test_fla_chunk_delta_rule_matches_torch():
    pytest.importorskip("fla")
    from pipo.engine import kernels

    torch.manual_seed(0)
    q, k, v, g, beta, state = _delta_inputs(2, 150, 2, 4, 128, 128)  # 150: chunks of 64 and a ragged tail
    ref_state = state.to("cpu", copy=True)
    out = kernels.chunk_delta_rule(q, k, v, g, beta, state)
    expected = kernels.chunk_delta_rule(*(t.to("cpu", copy=True) for t in (q, k, v, g, beta)), ref_state)
    torch.testing.assert_close(out.float().cpu(), expected.float(), atol=3e-2, rtol=3e-2, msg="fla chunk output")
    torch.testing.assert_close(state.cpu(), ref_state, atol=5e-3, rtol=5e-3, msg="fla chunk final state")


def test_fla_packed_chunk_delta_rule_matches_torch_per_sequence():
    """A packed prefill's variable-length chunked rule (fla, one row of 3 sequences with their own states) against
    the PyTorch path run on each sequence alone."""
    pytest.importorskip("fla")
    from pipo.engine import kernels

    torch.manual_seed(0)
    offsets = (0, 150, 151, 230)  # ragged chunks, a one-token sequence
    q, k, v, g, beta, _ = _delta_inputs(1, offsets[-1], 2, 4, 128, 128)
    state = _delta_inputs(3, 1, 2, 4, 128, 128)[-1]
    ref_state = state.to("cpu", copy=True)
    out = kernels.chunk_delta_rule(q, k, v, g, beta, state, offsets)
    for i, (a, b) in enumerate(zip(offsets, offsets[1:])):
        piece = (t[:, a:b].to("cpu", copy=True) for t in (q, k, v, g, beta))
        expected = kernels.chunk_delta_rule(*piece, ref_state[i : i + 1])
        torch.testing.assert_close(out[:, a:b].float().cpu(), expected.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(state.cpu(), ref_state, atol=5e-3, rtol=5e-3, msg="fla packed final states")


def test_delta_decode_kernel_matches_fla_and_torch(monkeypatch):
    """The decode step's Triton kernel (what `recurrent_delta_rule` runs for one token per row on a GPU) at the
    real shape, 256 rows: against the PyTorch path on CPU, with every launch config, and against fla's kernel."""
    from pipo.engine import delta_decode, kernels

    monkeypatch.setattr(kernels, "_CONFIGS", {})
    torch.manual_seed(0)
    q, k, v, g, beta, state = _delta_inputs(256, 1, 16, 32, 128, 128)
    g = g.float()  # the engine's log decay is fp32
    cpu = [t.to("cpu", copy=True) for t in (q, k, v, g, beta)]
    initial, ref_state = state.clone(), state.to("cpu", copy=True)
    out = kernels.recurrent_delta_rule(q, k, v, g, beta, state)
    assert any(key[0] == delta_decode.CONFIGS for key in kernels._CONFIGS), "the decode step did not run our kernel"
    expected = kernels.recurrent_delta_rule(*cpu, ref_state)  # PyTorch
    torch.testing.assert_close(out.float().cpu(), expected.float(), atol=2e-2, rtol=2e-2, msg="output vs torch")
    torch.testing.assert_close(state.cpu(), ref_state, atol=2e-3, rtol=2e-3, msg="state vs torch")
    for config in delta_decode.CONFIGS:
        final = torch.empty_like(state)
        got = delta_decode.decode_step(q, k, v, g, beta, initial, final, *config)
        torch.testing.assert_close(got, out, msg=f"output, config {config}")  # bf16 tolerance: sums may reorder
        torch.testing.assert_close(final, state, atol=1e-5, rtol=1e-5, msg=f"state, config {config}")
    if kernels.fla_ops() is not None:
        fla_state = initial.clone()
        fla_out = kernels._fla_recurrent(kernels.fla_ops()[1], q, k, v, g, beta, fla_state, fla_state)
        torch.testing.assert_close(out.float(), fla_out.float(), atol=1e-2, rtol=1e-2, msg="output vs fla")
        torch.testing.assert_close(state, fla_state, atol=1e-5, rtol=1e-5, msg="state vs fla")


def test_group_max_kernel_and_prefiltered_top_k_match_torch():
    """The sampler's top-k on a GPU at a real vocabulary (plus a ragged tail): the compiled group-max kernel
    equals torch's maxima bit for bit (-inf row, NaN), the default top-k (the prefilter) returns torch.topk's
    values, and its derived greedy token is torch.argmax's (ties across groups, the tail, NaN)."""
    from pipo.model.group_max import group_max, group_max_torch
    from pipo.model.sampling import TOP_K_GROUP, top_k

    torch.manual_seed(0)
    z = torch.randn(8, 248_320 + 77, device="cuda").to(torch.bfloat16)
    z[1] = float("-inf")
    z[2, [5, 99_999]] = float("nan")
    z[3, -1] = 50.0  # the maximum in the ragged tail
    z[4, [10, 200_000]] = 50.0  # the same maximum in two groups
    for dtype in (torch.bfloat16, torch.float32):
        for group in (TOP_K_GROUP, 100):
            torch.testing.assert_close(group_max(z.to(dtype), group), group_max_torch(z.to(dtype), group), rtol=0,
                                       atol=0, equal_nan=True, msg=f"{dtype}, groups of {group}")
    values, ids, greedy = top_k(z, 32, with_argmax=True)
    torch.testing.assert_close(values, torch.topk(z, 32, dim=-1).values, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(greedy, z.argmax(-1)) and greedy[3] == z.shape[1] - 1 and greedy[4] == 10
    assert ids.max() < z.shape[1] and (ids.sort(-1).values.diff(dim=-1) > 0).all()
