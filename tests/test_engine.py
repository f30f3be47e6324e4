"""The engine reproduces the reference generators exactly (greedy), batches and reuses slots, and samples correctly."""
from __future__ import annotations

import pytest
import torch

from pipo.engine import Engine, load_regular, speculative_accept
from pipo.errors import NotAPIPOCheckpointError, PIPOError, ShapeError
from pipo.model.reference import generate_mtp_reference, generate_pipo_reference, generate_regular_reference
from pipo.model.sampling import GREEDY, SamplingParams
from tests.conftest import FAMILIES

EOS = [2]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(30, 64)), [100], [40, 41, 42, 43]]
NEW = 14


@pytest.fixture(scope="module")
def regular_models(backbone_dir):
    """`regular_models(arch)` -> (folder, fp32 causal LM, native MTP head), cached."""
    cache = {}

    def build(arch):
        if arch not in cache:
            path = backbone_dir(arch, with_mtp=True)
            model, mtp = load_regular(path, with_mtp=True)
            cache[arch] = (path, model.float(), mtp.float())
        return cache[arch]

    return build


def engine_tokens(engine, prompts=PROMPTS, **kw):
    return [c[0].token_ids for c in engine.generate(prompts, GREEDY, max_new_tokens=NEW, **kw)]


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("slots", [1, 2])
def test_regular_eagle_mtp_match_references(regular_models, arch, slots):
    path, model, mtp = regular_models(arch)
    regular = [generate_regular_reference(model, p, NEW, GREEDY, EOS).token_ids for p in PROMPTS]
    mtp_ref = [generate_mtp_reference(model, mtp, p, NEW, GREEDY, EOS).token_ids for p in PROMPTS]
    for method, expected in (("regular", regular), ("eagle", regular), ("mtp", mtp_ref)):
        engine = Engine(path, method, max_batch_size=slots, max_seq_len=96, eos_token_ids=EOS, dtype=torch.float32)
        assert engine_tokens(engine) == expected, method


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("tau", [0.5, -1.0, 1.0])
def test_pipo_matches_reference(pipo_model, arch, tau):
    model = pipo_model(arch)
    with torch.no_grad():  # make the confidence head's decisions vary between steps
        model.confidence_head.fc2.weight.normal_(0, 2.0)
    expected = [generate_pipo_reference(model, p, NEW, GREEDY, tau, EOS) for p in PROMPTS]
    engine = Engine(model, "pipo", max_batch_size=2, max_seq_len=96, conf_threshold=tau, eos_token_ids=EOS)
    got = [c[0] for c in engine.generate(PROMPTS, GREEDY, max_new_tokens=NEW)]
    assert [c.token_ids for c in got] == [r.token_ids for r in expected]
    assert [c.raw_ids for c in got] == [r.raw_ids for r in expected]
    for c, r in zip(got, expected):
        assert (c.stats.pad_tokens, c.stats.forward_passes, c.stats.drafted, c.stats.accepted) == (
            r.pad_tokens, r.forward_passes, r.drafted, r.accepted)


@pytest.mark.parametrize("k", [1, 4])
def test_eagle_greedy_equals_regular_for_any_k(regular_models, k):
    path, model, _ = regular_models("qwen3_5")
    engine = Engine(path, "eagle", max_batch_size=3, max_seq_len=96, eos_token_ids=EOS, eagle_k=k)
    regular = Engine(path, "regular", max_batch_size=3, max_seq_len=96, eos_token_ids=EOS)
    assert engine_tokens(engine) == engine_tokens(regular)
    stats = [c[0].stats for c in engine.generate(PROMPTS, GREEDY, max_new_tokens=NEW)]
    assert all(s.drafted > 0 and 0 <= s.accepted <= s.drafted for s in stats)


def test_seeded_sampling_is_reproducible(regular_models):
    path, _, _ = regular_models("qwen3_5")
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, min_p=0.01, presence_penalty=1.5)
    for method in ("regular", "eagle"):
        engine = Engine(path, method, max_batch_size=2, max_seq_len=96)
        runs = [[c.token_ids for c in engine.generate(PROMPTS[:3], params, max_new_tokens=10, n=2, seed=s)[0]]
                for s in (1, 1, 2)]
        assert runs[0] == runs[1] and runs[0] != runs[2], method


def test_speculative_accept_preserves_target_distribution():
    """Exact check on a 6-token vocabulary: the emitted first token follows p whatever q drafts."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.2, 0.3, 0.2, 0.1]])
    q = torch.tensor([0.05, 0.05, 0.3, 0.3, 0.2, 0.1])
    trials = 40000
    drafts = torch.multinomial(q, trials, replacement=True, generator=gen)[:, None]
    accepted, bonus = speculative_accept(p.expand(trials, 2, 6), q.expand(trials, 1, 6), drafts, gen)
    first = torch.where(accepted == 1, drafts[:, 0], bonus)
    freq = torch.bincount(first, minlength=6).float() / trials
    assert (freq - p[0]).abs().sum() / 2 < 0.01  # total variation; ~0.004 expected at this sample size


@pytest.mark.slow
def test_eagle_sampled_distribution_matches_regular(regular_models):
    """On an effectively tiny vocabulary (top-k 3), the first three tokens of eagle and regular agree in law.

    Joint distribution over 27 outcomes from 1,800 samples each; total-variation distance below
    0.1 (two independent samples of the same law, `regular` with other seeds, give 0.115-0.12 at 600
    samples here, so about 0.07 at 1,800).
    """
    path, _, _ = regular_models("qwen3_5")
    params = SamplingParams(temperature=1.5, top_k=3)
    counts = {}
    for method in ("regular", "eagle"):
        engine = Engine(path, method, max_batch_size=64, max_seq_len=64, eagle_k=2, eos_token_ids=[])
        out = engine.generate([[5, 6, 7]], params, max_new_tokens=3, n=1800, seed=3)[0]
        keys = [tuple(c.token_ids) for c in out]
        counts[method] = {k: keys.count(k) / len(keys) for k in set(keys)}
    support = set(counts["regular"]) | set(counts["eagle"])
    tv = sum(abs(counts["regular"].get(k, 0) - counts["eagle"].get(k, 0)) for k in support) / 2
    assert tv < 0.1, tv


def test_stops_and_budget(regular_models):
    path, model, _ = regular_models("llama")
    engine = Engine(path, "regular", max_batch_size=2, max_seq_len=96, eos_token_ids=[])
    free = engine.generate([PROMPTS[0]], GREEDY, max_new_tokens=NEW)[0][0]
    assert len(free.token_ids) == NEW and free.finish_reason == "length"
    stop_id = free.token_ids[4]
    by_id = engine.generate([PROMPTS[0]], GREEDY, max_new_tokens=NEW, stop_token_ids=[stop_id])[0][0]
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1] and by_id.finish_reason == "eos"
    text = engine.tokenizer.decode(free.token_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    by_string = engine.generate([PROMPTS[0]], GREEDY, max_new_tokens=NEW, stop=[stop])[0][0]
    assert by_string.finish_reason == "stop" and stop not in by_string.text
    assert text.startswith(by_string.text)
    eos = Engine(path, "eagle", max_batch_size=2, max_seq_len=96, eos_token_ids=[stop_id])
    assert engine_tokens(eos, [PROMPTS[0]]) == [by_id.token_ids]


def test_prefix_cache_hits_equal_misses(pipo_model):
    model = pipo_model("qwen3_5")
    shared = list(range(10, 40))
    prompts = [shared, shared + [50, 51, 52, 53], shared + [60, 61, 62]]
    cold = Engine(model, "pipo", max_batch_size=2, max_seq_len=96, prefix_cache_size=0, eos_token_ids=EOS)
    room = Engine.blocks_for("pipo", 96, 2 + len(prompts))  # the running samples and every cached prompt
    warm = Engine(model, "pipo", max_batch_size=2, max_seq_len=96, prefix_cache_size=8, eos_token_ids=EOS,
                  num_blocks=room)
    misses = cold.generate(prompts, GREEDY, max_new_tokens=NEW, n=3)
    expected = [[c.token_ids for c in row] for row in misses]
    assert [[c.token_ids for c in row] for row in warm.generate(prompts, GREEDY, max_new_tokens=NEW, n=3)] == expected
    forwards = warm.metrics["prefill_forwards"]
    hits = warm.generate(prompts, GREEDY, max_new_tokens=NEW, n=3)  # every prompt now fully cached
    assert [[c.token_ids for c in row] for row in hits] == expected
    assert warm.metrics["prefill_forwards"] == forwards  # no prompt was prefilled again
    # a sample's prefill counts one forward pass whoever ran it, as in the reference generators
    assert [[c.stats.forward_passes for c in row] for row in hits] == [
        [c.stats.forward_passes for c in row] for row in misses]


def test_stats_and_text(regular_models):
    path, _, _ = regular_models("qwen3_5")
    engine = Engine(path, "eagle", max_batch_size=2, max_seq_len=96, eos_token_ids=EOS)
    out = engine.generate(["hello", [{"role": "user", "content": "1 + 2"}]], GREEDY, max_new_tokens=8)
    for (c,) in out:
        s = c.stats
        assert s.prompt_tokens > 0 and s.emitted_tokens == len(c.token_ids) and s.pad_tokens == 0
        assert 0 < s.ttft_s <= s.latency_s and s.forward_passes >= 1 and s.drafted >= s.accepted
        assert isinstance(c.text, str)


def test_bad_inputs(regular_models, pipo_model):
    path, _, _ = regular_models("llama")
    engine = Engine(path, "regular", max_batch_size=1, max_seq_len=16)
    with pytest.raises(ShapeError, match="empty"):
        engine.generate([[]])
    with pytest.raises(ShapeError, match="max_seq_len"):
        engine.generate([list(range(5, 25))])
    with pytest.raises(PIPOError, match="top_p"):
        engine.generate([[5]], SamplingParams(top_p=0))
    with pytest.raises(NotAPIPOCheckpointError):
        Engine(path, "pipo")
    with pytest.raises(PIPOError, match="native MTP"):
        Engine(pipo_model("llama"), "eagle")
