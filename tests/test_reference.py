"""Reference generators: threshold semantics, PAD handling, counters, seeding; greedy tokens against uncached
recomputation from the whole sequence."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipo.errors import PIPOError, ShapeError
from pipo.model.backbones import mtp_layer_config
from pipo.model.modeling import run_mtp_head
from pipo.model.reference import generate_mtp_reference, generate_pipo_reference, generate_regular_reference
from pipo.model.sampling import GREEDY, SamplingParams
from tests.conftest import FAMILIES

PROMPT = [11, 12, 13, 14, 15]  # odd: one PAD is appended before the backbone sees it


def run(model, tau, params=SamplingParams(), max_new=24, seed=0, **kw):
    return generate_pipo_reference(model, PROMPT, max_new, params, tau, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("arch", ["qwen3_5", "llama"])
def test_threshold_extremes(pipo_model, arch):
    model = pipo_model(arch)
    never = run(model, 1.0)
    assert never.emitted_tokens == never.forward_passes == 24  # one token per forward
    assert never.drafted == 0 and never.pad_tokens == never.forward_passes - 1
    always = run(model, -1.0)
    assert always.emitted_tokens == 24 and always.forward_passes == 12  # two per forward
    assert always.pad_tokens == 0 and always.accepted == always.drafted


def test_pads_never_reach_the_output(pipo_model):
    model = pipo_model("qwen3_5")
    result = run(model, 0.5)  # untrained confidence head: sigmoid ~ 0.5, a mix of drafts and PADs
    pad = model.pad_token_id
    assert pad not in result.token_ids
    assert result.raw_ids.count(pad) == result.pad_tokens
    assert [t for t in result.raw_ids if t != pad] == result.token_ids
    assert result.drafted == result.accepted + result.pad_tokens


def test_eos_stops_and_seeded_sampling_is_reproducible(pipo_model):
    model = pipo_model("llama")
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20)
    a, b = run(model, -1, params, seed=5), run(model, -1, params, seed=5)
    assert a.token_ids == b.token_ids
    first = run(model, 1.0, GREEDY).token_ids[0]
    stopped = run(model, 1.0, GREEDY, eos_token_ids=[first])
    assert stopped.token_ids == [first] and stopped.finished


def test_original_implementation_mode_forces_pad_at_prefill(pipo_model):
    model = pipo_model("llama")
    result = run(model, -1.0, draft_at_prefill=False)
    assert result.raw_ids[1] == model.pad_token_id and result.pad_tokens == 1


def test_regular_reference_matches_hf_greedy(backbone_dir):
    model = AutoModelForCausalLM.from_pretrained(backbone_dir("llama")).eval()
    ours = generate_regular_reference(model, PROMPT, 10, GREEDY)
    hf = model.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.token_ids == hf[0, len(PROMPT):].tolist()
    assert ours.forward_passes == 10


def test_bad_inputs(pipo_model):
    model = pipo_model("llama")
    with pytest.raises(ShapeError, match="empty prompt"):
        generate_pipo_reference(model, [], 4)
    with pytest.raises(PIPOError, match="top_p"):
        SamplingParams(top_p=0.0)


def argmax_without(logits: torch.Tensor, banned: int | None) -> int:
    logits = logits.float().clone()
    if banned is not None:
        logits[banned] = float("-inf")
    return int(logits.argmax())


@pytest.mark.parametrize("arch", FAMILIES)
def test_pipo_greedy_keeping_every_draft_is_the_full_forward_argmax(pipo_model, arch):
    """Teacher-forcing the generated raw ids through the full forward gives back every token: token1 of pair
    i+1 is the backbone's argmax at pair i, token2 the MTP head's (fed the gold token1); PAD is never chosen."""
    model = pipo_model(arch)
    result = run(model, -1.0, GREEDY, max_new=16)
    prompt = PROMPT + [model.pad_token_id]  # the reference evens the prompt out the same way
    ids = torch.tensor([prompt + result.raw_ids])
    assert result.pad_tokens == 0 and len(result.raw_ids) == 16
    with torch.no_grad():
        states = model(ids, output_pair_states=True)
    token1 = model.lm_head(states.hidden_states)[0]
    token2 = model.lm_head(states.mtp_hidden_states)[0]
    pad, first = model.pad_token_id, len(prompt) // 2 - 1  # pair `first` predicts the first generated token
    expected = []
    for i in range(first, first + len(result.raw_ids) // 2):
        expected += [argmax_without(token1[i], pad), argmax_without(token2[i], pad)]
    assert result.raw_ids == expected


def test_mtp_reference_is_the_direct_uncached_loop(backbone_dir):
    """Each step recomputed from the whole sequence without caches: the backbone's argmax, then the native MTP
    head over (x_t+1, h_t) for every position t, its last output's argmax committed unchecked."""
    from pipo.engine.parts import load_regular

    model, mtp = load_regular(backbone_dir("qwen3_5", with_mtp=True), with_mtp=True)
    model, mtp = model.float(), mtp.float()
    config = mtp_layer_config(model.config)
    sequence, expected = list(PROMPT), []
    with torch.no_grad():
        while len(expected) < 12:
            hidden = model.model(torch.tensor([sequence])).last_hidden_state
            token = argmax_without(model.lm_head(hidden[0, -1]), None)
            m = run_mtp_head(mtp, model.model, config, torch.tensor([sequence[1:] + [token]]), hidden)
            draft = argmax_without(model.lm_head(m[0, -1]), None)
            expected += [token, draft]
            sequence += [token, draft]
    result = generate_mtp_reference(model, mtp, PROMPT, 12, GREEDY)
    assert result.token_ids == expected and result.forward_passes == 6
