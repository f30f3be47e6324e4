"""Sampling transforms against distributions worked out by hand on a five-token vocabulary, and the samplers
against those distributions (total-variation bound); the same for the engine's per-row transforms and sampler;
`SamplingParams` validation; the top-k's group-max prefilter (its Triton kernel under the interpreter) against
torch.topk and torch.argmax."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from pipo.errors import PIPOError
from pipo.model import sampling
from pipo.model.group_max import group_max, group_max_torch
from pipo.model.sampling import (
    RowNoise,
    RowParams,
    SamplingMode,
    SamplingParams,
    apply_presence_penalty,
    probabilities,
    row_probabilities,
    sample,
    sample_logits,
    sample_rows,
    top_k,
)
from tests.conftest import TRITON_ON_CPU

BASE = [0.4, 0.3, 0.15, 0.1, 0.05]  # logits are log(BASE), so softmax(logits) == BASE
SEEN = [0]  # tokens already generated (the presence penalty's target)
DRAWS = 40_000
TV_BOUND = 0.015  # E[TV] of 40K draws over 5 tokens is below 0.005; 0.015 is three times that


def normalised(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


# (params, distribution worked out by hand from BASE; the penalty is applied to SEEN)
CASES = {
    "plain": (SamplingParams(), BASE),
    # T = 0.5 squares each probability: [.16, .09, .0225, .01, .0025] / .285
    "temperature": (SamplingParams(temperature=0.5), normalised([0.16, 0.09, 0.0225, 0.01, 0.0025])),
    "top_k": (SamplingParams(top_k=2), normalised([0.4, 0.3, 0, 0, 0])),
    # mass strictly above each token: 0, .4, .7, .85, .95 -> tokens with less than .75 above them stay
    "top_p": (SamplingParams(top_p=0.75), normalised([0.4, 0.3, 0.15, 0, 0])),
    # top-k 4 renormalises [.4, .3, .15, .1] by .95; mass above each: 0, .42, .74, .89 -> three stay (the engine
    # takes its top-k path: the nucleus found among the top-k values)
    "top_k_top_p": (SamplingParams(top_k=4, top_p=0.75), normalised([0.4, 0.3, 0.15, 0, 0])),
    # floor .3 * max = .12: .1 and .05 go
    "min_p": (SamplingParams(min_p=0.3), normalised([0.4, 0.3, 0.15, 0, 0])),
    # exp(log .4 - 1.5) = .4 e^-1.5 for the seen token, the others unchanged
    "presence": (SamplingParams(presence_penalty=1.5), normalised([0.4 * math.exp(-1.5), 0.3, 0.15, 0.1, 0.05])),
    # penalty ln 2 halves token 0: [.2, .3, .15, .1, .05]; T = .5: [.04, .09, .0225, .01, .0025];
    # top-k 4 drops .0025; top-p .9 over [.09, .04, .0225, .01] / .1625: mass above .01 is .938 -> it goes;
    # min-p .3: floor .3 * .09 = .027 drops .0225 -> [.04, .09] / .13
    "combined": (SamplingParams(temperature=0.5, top_k=4, top_p=0.9, min_p=0.3, presence_penalty=math.log(2)),
                 normalised([0.04, 0.09, 0, 0, 0])),
    "greedy": (SamplingParams(temperature=0.0, presence_penalty=1.5), [0.0, 1.0, 0.0, 0.0, 0.0]),  # the penalty moves the argmax
}


def base_logits(rows: int = 1) -> torch.Tensor:
    return torch.tensor(BASE).log().expand(rows, -1).contiguous()


def seen_mask(rows: int = 1) -> torch.Tensor:
    seen = torch.zeros(rows, len(BASE), dtype=torch.bool)
    seen[:, SEEN] = True
    return seen


def empirical(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=len(BASE)).double() / tokens.numel()


def row_params(params: list[SamplingParams]) -> RowParams:
    """The engine's per-row parameter tensors, one row per entry of `params`."""
    names = ("temperature", "top_p", "top_k", "min_p", "presence_penalty")
    return RowParams(*(torch.tensor([getattr(p, name) for p in params]) for name in names))


def draw_reference(params: SamplingParams) -> torch.Tensor:
    """`sample_logits`: logit space without top-p, through `probabilities` with it."""
    return sample_logits(base_logits(DRAWS), params, seen=seen_mask(DRAWS), generator=torch.Generator().manual_seed(1234))


def draw_engine(params: SamplingParams) -> torch.Tensor:
    """`sample_rows` with counter-based noise, one seed per row (rows with a top-k race over their candidates)."""
    seeds = torch.arange(DRAWS)
    noise = RowNoise(seeds, torch.zeros_like(seeds), 0)
    return sample_rows(base_logits(DRAWS), row_params([params] * DRAWS), SamplingMode.of([params]), noise,
                       seen=seen_mask(DRAWS))


@pytest.mark.parametrize("case", CASES)
def test_probabilities_by_hand(case):
    params, expected = CASES[case]
    logits = apply_presence_penalty(base_logits(), seen_mask(), params.presence_penalty)
    torch.testing.assert_close(probabilities(logits, params)[0], torch.tensor(expected), rtol=0, atol=1e-6)


def test_engine_rows_of_one_batch_get_their_hand_distributions():
    """`row_probabilities` (the engine's transforms, parameters per row) on a batch with one row per case."""
    params, expected = zip(*CASES.values())
    got = row_probabilities(base_logits(len(params)), row_params(list(params)), SamplingMode.of(list(params)), None,
                            seen_mask(len(params)))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("draw", [draw_reference, draw_engine], ids=["sample_logits", "sample_rows"])
@pytest.mark.parametrize("case", CASES)
def test_samplers_draw_the_hand_distribution(case, draw):
    """Reference and engine samplers: TV bound against the hand distribution, excluded ids never drawn."""
    params, expected = CASES[case]
    freq, expected = empirical(draw(params)), torch.tensor(expected, dtype=torch.float64)
    assert float((freq - expected).abs().sum() / 2) < TV_BOUND, (freq.tolist(), expected.tolist())
    assert not freq[expected == 0].any()


def test_sample_draws_each_id_with_its_probability():
    probs = torch.tensor(normalised([0.5, 0.0, 0.2, 0.3, 0.0])).expand(DRAWS, -1)
    freq = empirical(sample(probs, torch.Generator().manual_seed(7)))
    assert float((freq - probs[0].double()).abs().sum() / 2) < TV_BOUND and freq[1] == freq[4] == 0


def test_banned_ids_get_nothing_even_as_the_argmax():
    banned = torch.tensor([0])
    for params in (SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_p=0.5)):
        probs = probabilities(base_logits(), params, banned)[0]
        assert probs[0] == 0 and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)
        tokens = sample_logits(base_logits(2000), params, banned, generator=torch.Generator().manual_seed(3))
        assert not (tokens == 0).any()
    torch.testing.assert_close(probabilities(base_logits(), SamplingParams(), banned)[0],
                               torch.tensor(normalised([0, 0.3, 0.15, 0.1, 0.05])), rtol=0, atol=1e-6)


def test_same_generator_state_same_tokens():
    params = SamplingParams(temperature=0.7, top_p=0.9)
    draw = [sample_logits(base_logits(64), params, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*draw)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", -0.1), ("min_p", 1.0),
])
def test_sampling_params_reject_values_naming_the_field(field, value):
    with pytest.raises(PIPOError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_accept_the_edges():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams(temperature=1e-3).greedy


def test_top_k_rows_race_over_their_candidates_only():
    """With every sampled row top-k'd, `sample_rows` draws over the top-k candidates with the noise of those ids,
    and picks the token the whole-vocabulary race picks (top-p, min-p, temperatures, a greedy row mixed in)."""
    params = [SamplingParams(1.0, 0.9, 5), SamplingParams(0.7, 1.0, 3), SamplingParams(0.0),
              SamplingParams(1.0, 0.5, 8, 0.1), SamplingParams(2.0, 0.95, 20), SamplingParams(1.0, 1.0, 1)]
    rows = row_params(params)
    mode = SamplingMode.of(params)
    whole = SamplingMode(mode.greedy, mode.penalty, mode.top_k, mode.top_p, mode.min_p, top_k_all=False)
    assert mode.top_k_all and mode.top_k == 32
    torch.manual_seed(0)
    logits, seeds = torch.randn(len(params), 50), torch.arange(len(params))
    for counter in range(30):
        noise = RowNoise(seeds, seeds * 3 + counter, 1)
        fast = sample_rows(logits, rows, mode, noise)
        assert fast.tolist() == sample_rows(logits, rows, whole, noise).tolist()
        assert fast[2] == logits[2].argmax() and fast[5] == logits[5].argmax()


def test_fused_sampler_draws_the_eager_tokens():
    """`sample_rows(fused=True)`, its elementwise stretches through torch.compile as in the engine's graph
    captures, draws the eager tokens: over the top-k candidates and over the whole vocabulary."""
    params = [SamplingParams(1.0, 0.9, 5), SamplingParams(0.7, 1.0, 3), SamplingParams(0.0),
              SamplingParams(1.0, 0.5, 8, 0.1), SamplingParams(2.0, 0.95, 20)]
    rows, mode = row_params(params), SamplingMode.of(params)
    whole = SamplingMode(mode.greedy, mode.penalty, mode.top_k, mode.top_p, mode.min_p, top_k_all=False)
    torch.manual_seed(0)
    logits, seeds = torch.randn(len(params), 300), torch.arange(len(params))
    for each in (mode, whole):
        for counter in range(3):
            noise = RowNoise(seeds, seeds * 3 + counter, 1)
            fused = sample_rows(logits, rows, each, noise, fused=True)
            assert fused.tolist() == sample_rows(logits, rows, each, noise).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("width", "group"), [(4096, 32), (1000, 32), (777, 8)])  # whole groups / ragged tails
def test_group_prefiltered_top_k_equals_torch_topk(dtype, width, group):
    """`top_k`'s group-max prefilter (forced on CPU here; the default runs it on CUDA) returns torch.topk's values,
    sorted, with distinct ids holding them: random rows, rows of many ties, rows mostly -inf (banned / masked)
    down to fewer finite values than k; k up to 64."""
    torch.manual_seed(0)
    rows = torch.randn(6, width)
    ties = torch.randint(0, 4, (6, width)).float()
    masked = rows.masked_fill(torch.rand(6, width) < 0.9, float("-inf"))
    masked[0, 10:] = float("-inf")  # 10 finite values: fewer than k
    masked[1] = float("-inf")
    masked[1, width - 1] = 0.0  # the one finite value sits in the ragged tail (when there is one)
    for z in (rows, ties, masked):
        z = z.to(dtype)
        for k in (1, 5, 32, 64):
            values, ids, greedy = top_k(z, k, group, with_argmax=True)
            expected = torch.topk(z, k, dim=-1)
            assert torch.equal(values, expected.values), (k, z)
            assert torch.equal(z.gather(1, ids), values)
            assert (ids.sort(-1).values.diff(dim=-1) > 0).all() and ids.max() < width
            assert torch.equal(greedy, z.argmax(-1))
            plain = top_k(z, k)  # the default on CPU: torch.topk itself, ids and all
            assert torch.equal(plain[0], expected.values) and torch.equal(plain[1], expected.indices)


def exact(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit for bit, dtype included, NaN where NaN."""
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def group_max_by_slices(z: torch.Tensor, group: int) -> torch.Tensor:
    """The definition of `group_max`: one amax per slice of `group` columns, the last one ragged."""
    return torch.stack([z[:, start:start + group].amax(-1) for start in range(0, z.shape[1], group)], dim=1)


def awkward_rows(width: int) -> torch.Tensor:
    """Rows [5, width]: random, small-integer ties, all -inf, finite only in the last column (the ragged tail
    of most group sizes), and random with a NaN and a +inf."""
    torch.manual_seed(0)
    z = torch.cat([torch.randn(1, width), torch.randint(0, 3, (1, width)).float(),
                   torch.full((2, width), float("-inf")), torch.randn(1, width)])
    z[3, -1] = -1.0
    z[4, width // 3], z[4, width // 2] = float("nan"), float("inf")
    return z


@pytest.mark.parametrize(("width", "group"), [(1000, 32), (777, 8), (300, 100), (5, 8), (256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_max_is_the_max_of_each_slice(width, group, dtype):
    """The torch path (what CPU runs) against its definition: ragged tails, a single partial group, -inf, NaN;
    a strided view (a slice of wider rows) too."""
    z = awkward_rows(width).to(dtype)
    expected = group_max_by_slices(z, group)
    exact(group_max(z, group), expected)
    wide = torch.cat([z, torch.randn(5, 3).to(dtype)], dim=1)
    exact(group_max_torch(wide[:, :width], group), expected)


@TRITON_ON_CPU
@pytest.mark.parametrize(("width", "group", "block"), [(1000, 32, 128), (777, 8, 64), (300, 100, 256), (5, 8, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_max_triton_kernel_matches_torch(width, group, block, dtype):
    """The Triton kernel (under the interpreter) equals the torch path bit for bit: several groups per program,
    ragged tails, a group size that is not a power of two, -inf rows, NaN propagated like torch.amax; and it
    reads a strided view (a slice of wider rows) in place."""
    from pipo.model.group_max import group_max_triton

    z = awkward_rows(width).to(dtype)
    got = group_max_triton(z, group, block)
    exact(got, group_max_torch(z, group))
    assert got[4, width // 3 // group].isnan()
    wide = torch.cat([z, torch.randn(5, 3).to(dtype)], dim=1)
    exact(group_max_triton(wide[:, :width], group, block), got)


def argmax_cases(width: int) -> torch.Tensor:
    """Rows [.., width] whose argmax is decided by ties: across groups, within one, at +inf, in the tail, all -inf,
    all equal, and NaN (which argmax takes as the largest)."""
    z = torch.randn(8, width)
    z[0, [40, 41, 900]] = 9.0  # the same maximum in two groups, twice in the first of them
    z[1, [width - 5, width - 1]] = 9.0  # twice in the ragged tail
    z[2] = float("-inf")
    z[3] = 0.0
    z[4] = float("-inf")
    z[4, width - 4] = -3.0  # the one finite logit, in the tail
    z[5, [33, 64, 500]] = float("inf")
    z[6, [700, 500]] = float("nan")
    z[6, 100] = float("inf")
    z[7] = torch.randint(0, 2, (width,)).float()  # ties everywhere
    return z


@pytest.mark.parametrize("group", [32, 7, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_from_group_maxima_is_torch_argmax(group, dtype):
    """`top_k(..., with_argmax=True)` derives the greedy token from the group maxima: the same index as
    torch.argmax (the first maximum), with ties across and within groups, the ragged tail, -inf rows and NaN."""
    z = argmax_cases(1000).to(dtype)
    values, ids, greedy = top_k(z, 4, group, with_argmax=True)
    assert torch.equal(greedy, z.argmax(-1)), (greedy, z.argmax(-1))
    assert greedy.tolist()[:6] == [40, 995, 0, 0, 996, 33]
    assert torch.equal(values[:6], torch.topk(z[:6], 4, dim=-1).values)


@TRITON_ON_CPU
def test_argmax_from_triton_group_maxima_is_torch_argmax():
    """The same derivation from the Triton kernel's maxima (the CUDA path), NaN row included."""
    from pipo.model.group_max import group_max_triton

    z = argmax_cases(1000)
    assert torch.equal(sampling._argmax_of_groups(z, 32, group_max_triton(z, 32, 256)), z.argmax(-1))


def test_prefiltered_top_k_sampler_draws_the_whole_vocabulary_race(monkeypatch):
    """`sample_rows` with every sampled row top-k'd, through the group prefilter (forced on CPU, groups of 8 over
    300 ids: a ragged tail) draws the tokens of the whole-vocabulary race, greedy rows their argmax."""
    params = [SamplingParams(1.0, 0.9, 5), SamplingParams(0.0), SamplingParams(1.0, 0.5, 8, 0.1),
              SamplingParams(2.0, 0.95, 20), SamplingParams(0.0)]
    rows, mode = row_params(params), SamplingMode.of(params)
    whole = SamplingMode(mode.greedy, mode.penalty, mode.top_k, mode.top_p, mode.min_p, top_k_all=False)
    torch.manual_seed(0)
    logits, seeds = torch.randn(len(params), 300), torch.arange(len(params))
    logits[4, 297] = 10.0  # a greedy row whose argmax sits in the ragged tail
    monkeypatch.setattr(sampling, "top_k", functools.partial(top_k, group=8))
    for counter in range(10):
        noise = RowNoise(seeds, seeds * 3 + counter, 1)
        fast = sample_rows(logits, rows, mode, noise)
        assert fast.tolist() == sample_rows(logits, rows, whole, noise).tolist()
        assert fast[1] == logits[1].argmax() and fast[4] == 297
