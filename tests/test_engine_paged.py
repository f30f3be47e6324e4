"""Paged KV memory: exact outputs under preemption, shared prompt blocks, prefix hits, no leaked blocks, order."""
from __future__ import annotations

import pytest
import torch

from pipo.engine import Engine, load_regular
from pipo.errors import PIPOError, ShapeError
from pipo.model.reference import generate_mtp_reference, generate_pipo_reference, generate_regular_reference
from pipo.model.sampling import GREEDY, SamplingParams
from pipo.serve.stream import TextStream
from tests.conftest import TRITON_ON_CPU

EOS = [2]
# mixed lengths, a prompt that extends another (prefix hit), a repeated prompt (full hit)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(30, 52)), [5, 6, 7, 8, 9, 10, 11, 12, 13], [100],
           [20, 21, 22]]
NEW = 12
# prefill: chunks of 8, up to 2 prompts per forward (16 positions, packed)
TIGHT = dict(block_size=4, max_seq_len=40, max_batch_size=3, prefill_chunk=8, prefill_rows=2, max_prefill_tokens=16)


@pytest.fixture(scope="module")
def qwen_regular(backbone_dir):
    path = backbone_dir("qwen3_5", with_mtp=True)
    model, mtp = load_regular(path, with_mtp=True)
    return path, model.float(), mtp.float()


def distinct_prompts(count: int) -> list[list[int]]:
    """`count` prompts of 3-6 tokens, none a prefix of another (each prefills on its own)."""
    return [[5 + 7 * i + j for j in range(3 + i % 4)] for i in range(count)]


def tight_engine(model, method, spare: int = 4, **kw) -> Engine:
    """An engine whose pool holds one sequence of max_seq_len and `spare` blocks more: sequences get preempted.
    PIPO's pool holds one sequence of max_seq_len pairs (at tau >= 1 each pair shows one token), while its
    samples here use about half that: it runs twice the rows to run out."""
    kw = {**TIGHT, **({"max_batch_size": 2 * TIGHT["max_batch_size"]} if method == "pipo" else {}), **kw}
    probe = Engine(model, method, eos_token_ids=EOS, num_blocks=64, **kw)
    return Engine(model, method, eos_token_ids=EOS, num_blocks=probe.blocks_per_seq + spare, **kw)


def check_no_leaks(engine: Engine) -> None:
    assert not engine.has_unfinished() and not engine.running and not engine.prefilling
    engine.prefix_cache.clear()
    assert engine.pool.available == engine.pool.capacity
    assert sorted(engine.free_slots) == list(range(engine.max_batch_size))
    assert int(engine.decoder.tables.abs().sum()) == 0
    assert not engine.queued_prompts  # no prompt outlives its requests


@pytest.mark.parametrize("method", ["regular", "mtp", "eagle"])
def test_regular_methods_exact_under_preemption(qwen_regular, method):
    path, model, mtp = qwen_regular
    if method == "mtp":
        expected = [generate_mtp_reference(model, mtp, p, NEW, GREEDY, EOS).token_ids for p in PROMPTS]
    else:
        expected = [generate_regular_reference(model, p, NEW, GREEDY, EOS).token_ids for p in PROMPTS]
    engine = tight_engine(path, method)
    out = engine.generate(PROMPTS, GREEDY, max_new_tokens=NEW, n=2)
    assert [[c.token_ids for c in row] for row in out] == [[e, e] for e in expected]
    assert engine.metrics["preemptions"] > 0
    assert engine.prefix_cache.hit_blocks > 0
    assert engine.metrics["prefill_rows_max"] == 2  # prompts prefilled together in one packed forward
    check_no_leaks(engine)


@pytest.mark.parametrize("tau", [0.5, -1.0])
def test_pipo_exact_under_preemption(pipo_model, tau):
    model = pipo_model("qwen3_5")
    with torch.no_grad():  # make the confidence head's decisions vary between steps
        model.confidence_head.fc2.weight.normal_(0, 2.0)
    expected = [generate_pipo_reference(model, p, NEW, GREEDY, tau, EOS) for p in PROMPTS]
    engine = tight_engine(model, "pipo", spare=1, conf_threshold=tau)
    out = engine.generate(PROMPTS, GREEDY, max_new_tokens=NEW, n=2)
    assert [[c.raw_ids for c in row] for row in out] == [[r.raw_ids, r.raw_ids] for r in expected]
    assert engine.metrics["preemptions"] > 0
    assert engine.metrics["prefill_rows_max"] == 2
    check_no_leaks(engine)


def test_fused_projections_are_exact_and_follow_in_place_updates(pipo_model):
    """Projections of one input fused into one GEMM (the modules' weights become views of it): outputs equal the
    reference's, an in-place update of a module's weight reaches the engine, a second engine shares the weights."""
    model = pipo_model("qwen3_5")
    with torch.no_grad():
        model.confidence_head.fc2.weight.normal_(0, 2.0)
    engine = Engine(model, "pipo", eos_token_ids=EOS, conf_threshold=0.5, fuse_projections=True, **TIGHT)
    layers = [*model.model.layers, *engine.parts.mtp.layers]
    fused = [*engine.decoder.backbone.weights, *engine.decoder.mtp.weights]
    linear = next(i for i, layer in enumerate(layers) if hasattr(layer, "linear_attn"))
    attention = next(i for i, layer in enumerate(layers) if hasattr(layer, "self_attn"))
    assert layers[linear].linear_attn.in_proj_z.weight.data_ptr() == fused[linear].inputs[
        layers[linear].linear_attn.in_proj_qkv.out_features].data_ptr()
    assert layers[attention].self_attn.k_proj.weight.data_ptr() == fused[attention].inputs[
        layers[attention].self_attn.q_proj.out_features].data_ptr()
    assert all(w.inputs is not None and w.mlp is not None for w in fused)

    def check() -> list[list[int]]:
        expected = [generate_pipo_reference(model, p, NEW, GREEDY, 0.5, EOS).raw_ids for p in PROMPTS[:4]]
        out = engine.generate(PROMPTS[:4], GREEDY, max_new_tokens=NEW)
        assert [row[0].raw_ids for row in out] == expected
        return expected

    before = check()
    with torch.no_grad():  # as an optimizer step does: in place, on the module's own weights
        for layer in layers:
            layer.mlp.up_proj.weight.mul_(-1.5)
            (layer.linear_attn.in_proj_a if hasattr(layer, "linear_attn") else layer.self_attn.v_proj).weight.add_(0.3)
    engine.prefix_cache.clear()
    assert check() != before
    again = Engine(model, "pipo", eos_token_ids=EOS, fuse_projections=True, **TIGHT)
    assert [w.inputs.data_ptr() for w in again.decoder.backbone.weights] == [
        w.inputs.data_ptr() for w in engine.decoder.backbone.weights]
    model.double()  # `.to` replaces every weight: the next engine fuses the new ones
    moved = Engine(model, "pipo", eos_token_ids=EOS, fuse_projections=True, dtype=torch.float64, **TIGHT)
    first = moved.decoder.backbone.weights[linear]
    assert first.inputs.dtype == torch.float64
    assert layers[linear].linear_attn.in_proj_qkv.weight.data_ptr() == first.inputs.data_ptr()


def test_projections_are_fused_only_where_updates_still_reach_them():
    """`fuse_weights` leaves alone what it cannot alias safely: a weight inside someone else's flat buffer (a
    trainer's), a tied weight, a module with a hook; weights fused already are reused; an engine built in
    inference mode leaves trainable parameters."""
    from torch import nn

    from pipo.engine.stack import fuse_weights

    def pair() -> list[nn.Linear]:
        return [nn.Linear(4, 3, bias=False), nn.Linear(4, 2, bias=False)]

    flat, inside = torch.randn(40), pair()
    inside[0].weight.data, inside[1].weight.data = flat[4:16].view(3, 4), flat[16:24].view(2, 4)
    tied = pair()[:1] * 2
    hooked = pair()
    hooked[1].register_forward_pre_hook(lambda *args: None)
    assert fuse_weights(inside) is None and fuse_weights(tied) is None and fuse_weights(hooked) is None
    assert inside[0].weight.data_ptr() == flat[4:].data_ptr()  # untouched: the buffer's updates still reach it
    fresh = pair()
    expected = torch.cat([m.weight.detach().clone() for m in fresh])
    with torch.inference_mode():
        fused = fuse_weights(fresh)
    assert torch.equal(fused, expected) and fuse_weights(fresh).data_ptr() == fused.data_ptr()
    x = torch.randn(2, 4)
    fresh[1](x).sum().backward()  # still an ordinary parameter
    assert fresh[1].weight.grad is not None and not fresh[1].weight.is_inference()


@pytest.mark.parametrize("method", ["regular", "mtp", "eagle", "pipo"])
def test_sampling_depends_only_on_the_seed(pipo_model, qwen_regular, method):
    """Sampled tokens are the same alone, in a batch, and preempted and recomputed."""
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, min_p=0.01, presence_penalty=1.5)
    model = pipo_model("qwen3_5") if method == "pipo" else qwen_regular[0]
    roomy = Engine(model, method, eos_token_ids=EOS, **{**TIGHT, "max_batch_size": 1})
    alone = [roomy.generate([p], params, max_new_tokens=NEW, seeds=[7 + i])[0][0].raw_ids
             for i, p in enumerate(PROMPTS)]
    tight = tight_engine(model, method, spare=1 if method == "pipo" else 4)
    together = tight.generate(PROMPTS, params, max_new_tokens=NEW, seeds=[7 + i for i in range(len(PROMPTS))])
    assert [row[0].raw_ids for row in together] == alone
    assert tight.metrics["preemptions"] > 0
    other = roomy.generate(PROMPTS[:1], params, max_new_tokens=NEW, seeds=[8])[0][0].raw_ids
    assert other != alone[0]


@pytest.mark.parametrize("method", ["regular", "pipo", "mtp", "eagle"])
def test_first_tokens_of_prompts_prefilled_together(pipo_model, qwen_regular, method):
    """Prompts that finish prefill in one step get their first token(s) together, over slots that need not be
    contiguous (1 runs while 0 and 2 start): mtp and eagle in one batched call, regular and pipo in the decode
    step that runs their last unit (no call of their own); every sample equals the one decoded alone."""
    model = pipo_model("qwen3_5") if method == "pipo" else qwen_regular[0]
    sampled = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, presence_penalty=1.5)
    plan = [("r0", PROMPTS[0], 1, sampled), ("r1", PROMPTS[2], NEW, GREEDY), ("r2", PROMPTS[1], 1, GREEDY),
            ("r3", PROMPTS[3], NEW, sampled), ("r4", PROMPTS[4], NEW, GREEDY)]
    kw = dict(eos_token_ids=[], block_size=4, max_seq_len=40)
    alone = Engine(model, method, max_batch_size=1, **kw)
    expected = [alone.generate([prompt], params, max_new_tokens=budget, seeds=[i])[0][0].raw_ids
                for i, (_, prompt, budget, params) in enumerate(plan)]
    engine = Engine(model, method, max_batch_size=3, **kw)
    calls = []
    first = engine.decoder.first
    engine.decoder.first = lambda seqs: calls.append(sorted(seqs)) or first(seqs)
    done = {}
    for i, (rid, prompt, budget, params) in enumerate(plan[:3]):
        engine.add_request(rid, prompt, params, max_new_tokens=budget, seed=i)
    for u in engine.step():  # r0 and r2 end at their first token, r1 runs on in slot 1
        done[u.request_id] = u.completion.raw_ids if u.finished else None
    for i, (rid, prompt, budget, params) in enumerate(plan[3:], start=3):
        engine.add_request(rid, prompt, params, max_new_tokens=budget, seed=i)
    while engine.has_unfinished():
        for u in engine.step():
            if u.finished:
                done[u.request_id] = u.completion.raw_ids
    assert calls == ([] if engine.decoder.decodes_last_unit else [[0, 1, 2], [0, 2]])
    assert [done[rid] for rid, *_ in plan] == expected
    check_no_leaks(engine)


@pytest.mark.parametrize("method", ["regular", "pipo", "mtp", "eagle"])
def test_an_idle_slot_inside_the_batch_stays_inside_its_table(pipo_model, qwen_regular, method):
    """A slot whose sample ended sits idle between running ones, and its cache length grows with every step:
    its positions must stay inside the block table (EAGLE's chained drafts ran past it, and PIPO's MTP step
    before its positions came from the backbone step), and they sit at 0, so that its attention reads a few
    keys, not the whole table; every sample equals the one decoded alone."""
    model = pipo_model("qwen3_5") if method == "pipo" else qwen_regular[0]
    kw = dict(eos_token_ids=[], block_size=1, max_seq_len=26)
    plan = [("a", [5, 6, 7], 22), ("b", list(range(30, 50)), 1), ("c", [8, 9, 10], 22)]
    alone = Engine(model, method, max_batch_size=1, **kw)
    expected = [alone.generate([prompt], GREEDY, max_new_tokens=new)[0][0].raw_ids for _, prompt, new in plan]
    engine = Engine(model, method, max_batch_size=3, **kw)
    for rid, prompt, new in plan:
        engine.add_request(rid, prompt, GREEDY, max_new_tokens=new)
    done, idle_seen = {}, False
    while engine.has_unfinished():
        done.update((u.request_id, u.completion.raw_ids) for u in engine.step() if u.finished)
        positions = engine.decoder.positions(3, 2)
        for slot in set(range(3)) - set(engine.running):
            idle_seen |= 0 < slot < max(engine.running, default=0)
            assert positions[slot].tolist() == [0, 1]
        for slot in engine.running:
            assert positions[slot, 0] == min(engine.decoder.lengths[slot], engine.decoder.capacity - 1)
    assert idle_seen
    assert [done[rid] for rid, *_ in plan] == expected
    check_no_leaks(engine)


@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("method", ["regular", "pipo", "mtp", "eagle"])
def test_running_rows_write_only_their_own_blocks(pipo_model, qwen_regular, method, block_size):
    """Every cache entry that a running row's decode step or first-token call writes lies in a block of its own,
    never in the sink block 0 that idle rows write (EAGLE's chained drafts ran past the blocks reserved for
    them, in its first call and while a step was in flight: a sampled sample then depended on its batch);
    the sampled sample decoded next to a slot that goes idle equals the one decoded alone."""
    model = pipo_model("qwen3_5") if method == "pipo" else qwen_regular[0]
    sampled = SamplingParams(temperature=1.0)
    kw = dict(eos_token_ids=[], block_size=block_size, max_seq_len=64)
    alone = Engine(model, method, max_batch_size=1, **kw).generate([[5, 6, 7, 8]], sampled, max_new_tokens=40,
                                                                   seeds=[5])[0][0].raw_ids
    engine = Engine(model, method, max_batch_size=3, **kw)
    sink_writes = []

    def watched(fn):
        def call(rows, kv_len, *tensors):
            tables, positions = engine.decoder.tables[rows], tensors[-1]
            blocks = tables.gather(1, (positions // block_size).clamp(max=tables.shape[1] - 1))
            sink_writes.extend(positions[(tables[:, :1] != 0) & (blocks == 0)].tolist())
            return fn(rows, kv_len, *tensors)
        return call

    engine.decoder.backbone_step = watched(engine.decoder.backbone_step)
    engine.decoder.mtp_step = watched(engine.decoder.mtp_step)
    for rid, prompt, new, seed in [("a", [5, 6, 7, 8], 40, 5), ("x", [30, 31, 32], 2, 6), ("y", [40, 41], 40, 7)]:
        engine.add_request(rid, prompt, sampled, max_new_tokens=new, seed=seed)
    done = {}
    while engine.has_unfinished():
        done.update((u.request_id, u.completion.raw_ids) for u in engine.step() if u.finished)
    assert sink_writes == []
    assert done["a"] == alone
    check_no_leaks(engine)


def test_samples_start_in_the_step_that_prefills_their_prompt(qwen_regular):
    """The n samples of a prompt share one prefill forward and start decoding in its step (their first tokens
    come with the next step's updates, emission running one step late)."""
    engine = Engine(qwen_regular[0], "regular", eos_token_ids=[], block_size=4, max_seq_len=40)
    engine.add_request("a", PROMPTS[0], SamplingParams(temperature=1.0), max_new_tokens=NEW, n=3, seed=5)
    engine.add_request("b", PROMPTS[1], GREEDY, max_new_tokens=NEW)
    samples = [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    engine.step()
    assert sorted((s.request_id, s.sample) for s in engine.running.values()) == samples
    assert engine.metrics["prefill_forwards"] == 1 and engine.prefix_cache.hit_blocks > 0
    assert sorted((u.request_id, u.sample) for u in engine.step()) == samples
    while engine.has_unfinished():
        engine.step()
    check_no_leaks(engine)


@pytest.mark.parametrize("method", ["regular", "eagle"])
def test_a_finished_sequence_is_released_not_preempted(qwen_regular, method):
    """Samples that end at their first token are the newest while two long ones outgrow the pool: they must
    finish (a preempted finished sample used to be requeued, and the engine then never finished)."""
    path, model, _ = qwen_regular
    engine = tight_engine(path, method, spare=3)
    longs = [list(range(30, 52)), list(range(60, 80))]
    for i, prompt in enumerate(longs):
        engine.add_request(f"long{i}", prompt, GREEDY, max_new_tokens=16)
    for i in range(4):
        engine.add_request(f"short{i}", PROMPTS[3][: 3 + i], GREEDY, max_new_tokens=1, n=2)
    done = {}
    for _ in range(200):
        for update in engine.step():
            if update.finished:
                done[(update.request_id, update.sample)] = update.completion.token_ids
        if not engine.has_unfinished():
            break
    assert engine.metrics["preemptions"] > 0 and len(done) == 10
    for i, prompt in enumerate(longs):
        assert done[(f"long{i}", 0)] == generate_regular_reference(model, prompt, 16, GREEDY, EOS).token_ids
    for i in range(4):
        first = generate_regular_reference(model, PROMPTS[3][: 3 + i], 1, GREEDY, EOS).token_ids
        assert done[(f"short{i}", 0)] == done[(f"short{i}", 1)] == first
    check_no_leaks(engine)


def test_admission_is_fifo_and_the_newest_is_preempted(qwen_regular):
    engine = tight_engine(qwen_regular[0], "regular")
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", prompt, GREEDY, max_new_tokens=30)
    seqs = [s for i in range(3) for s in engine.requests[f"r{i}"]]
    victims = []
    while engine.has_unfinished():
        before = {id(s): s.order for s in [*engine.running.values(), *engine.prefilling]}
        preempted = engine.metrics["preemptions"]
        engine.step()
        if engine.metrics["preemptions"] > preempted:
            victim = engine.waiting[0]
            assert victim.order == max(before.values())
            victims.append(victim)
    orders = [s.order for s in seqs]
    assert victims and orders == sorted(orders)  # re-admissions keep the first-come order: r0 < r1 < r2
    check_no_leaks(engine)


def test_request_api_streams_and_aborts(qwen_regular):
    path = qwen_regular[0]
    engine = Engine(path, "regular", eos_token_ids=[], block_size=4, max_seq_len=64)
    engine.add_request("a", PROMPTS[0], GREEDY, max_new_tokens=NEW, n=2)
    engine.add_request("b", PROMPTS[2], GREEDY, max_new_tokens=50)
    streamed: dict = {}
    finished = {}
    while engine.has_unfinished():
        for u in engine.step():
            ids, text, stream = streamed.setdefault((u.request_id, u.sample),
                                                    ([], [], TextStream(engine.tokenizer, (), False, False)))
            ids += u.token_ids
            text.append(stream.push(ids)[1])
            if u.finished:
                text.append(stream.finish(u.completion.text)[1])
                finished[(u.request_id, u.sample)] = u.completion
        if ("a", 0) in finished and "b" in engine.requests:
            engine.abort("b")
    for key, completion in finished.items():
        if key[0] == "a":
            assert streamed[key][0] == completion.token_ids and "".join(streamed[key][1]) == completion.text
    assert "b" not in engine.requests and ("b", 0) not in finished
    check_no_leaks(engine)


def test_pool_smaller_than_one_sequence_is_refused(qwen_regular):
    with pytest.raises(PIPOError, match="cannot hold one sequence of max_seq_len=40"):
        Engine(qwen_regular[0], "regular", num_blocks=5, **TIGHT)


def test_max_seq_len_beyond_the_models_positions_is_refused(qwen_regular):
    with pytest.raises(PIPOError, match="max_seq_len=8193 exceeds the model's max_position_embeddings 8192"):
        Engine(qwen_regular[0], "regular", max_seq_len=8193, num_blocks=5)


def test_pipo_pads_do_not_cut_a_sequence_short(pipo_model):
    """`max_seq_len` counts the tokens a sequence shows: a budget that fills it is emitted whole (as the
    reference does) although a pair holding a PAD shows one token (at tau >= 1, every pair does)."""
    model = pipo_model("qwen3_5")
    prompt, new = [5, 6, 7, 8], 36
    expected = generate_pipo_reference(model, prompt, new, GREEDY, 1.0, [])
    engine = Engine(model, "pipo", eos_token_ids=[], block_size=4, max_seq_len=len(prompt) + new, max_batch_size=1,
                    conf_threshold=1.0)
    completion = engine.generate([prompt], GREEDY, max_new_tokens=new)[0][0]
    assert completion.raw_ids == expected.raw_ids and len(completion.token_ids) == new
    assert completion.stats.pad_tokens > 0
    check_no_leaks(engine)


@pytest.mark.parametrize("method", ["regular", "mtp", "eagle", "pipo"])
def test_odd_prompts_pad_to_pairs_only_for_pipo(qwen_regular, pipo_model, method):
    """A prompt one token short of max_seq_len leaves room for one token, except for PIPO, which pads it to
    whole pairs (then it fills the sequence)."""
    model = pipo_model("qwen3_5") if method == "pipo" else qwen_regular[0]
    engine = Engine(model, method, eos_token_ids=[], block_size=4, max_seq_len=30, max_batch_size=1)
    prompt = list(range(5, 34))
    if method == "pipo":
        with pytest.raises(ShapeError, match="max_seq_len=30"):
            engine.generate([prompt])
    else:
        assert len(engine.generate([prompt], GREEDY, max_new_tokens=4)[0][0].token_ids) == 1
    check_no_leaks(engine)


@TRITON_ON_CPU
@pytest.mark.parametrize(
    ("steps", "group", "block_size", "sms", "n_splits"),
    # eagle-like / one query, 2 tiles per block / many splits / more chunks than the short row has tiles
    [(2, 2, 16, 4, None), (1, 4, 64, 1, None), (4, 1, 32, 64, None), (1, 2, 16, 1, 5)],
)
def test_paged_triton_kernel_matches_sdpa(steps, group, block_size, sms, n_splits):
    """The paged split-K kernel against SDPA over the gathered blocks; each row splits its own filled keys."""
    from pipo.engine import flash_decode

    device = "cpu"
    torch.manual_seed(0)
    batch, kv_heads, d, blocks = 2, 2, 16, 3
    pool_k, pool_v = torch.randn(2, 12, kv_heads, block_size, d, device=device).unbind(0)
    tables = torch.tensor([[3, 7, 1], [5, 2, 9]], device=device)
    last = torch.tensor([block_size + 5, 3 * block_size - 1], device=device)  # mid-block / the table's last key
    positions = last[:, None] - torch.arange(steps - 1, -1, -1, device=device)
    q = torch.randn(batch, kv_heads, group * steps, d, device=device)
    out = flash_decode.paged_decode_attention(q, pool_k, pool_v, tables, positions, d**-0.5, sms=sms,
                                              n_splits=n_splits)
    keys = pool_k[tables].transpose(1, 2).reshape(batch, kv_heads, blocks * block_size, d)
    values = pool_v[tables].transpose(1, 2).reshape(batch, kv_heads, blocks * block_size, d)
    mask = torch.arange(blocks * block_size, device=device)[None, None] <= positions[:, :, None]
    mask = mask[:, None].repeat(1, 1, group, 1)  # query row g*T + t of a KV head: step t of group head g
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=d**-0.5)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["mtp", "pipo"])
def test_packed_prefill_matches_one_chunk_per_forward(qwen_regular, pipo_model, method):
    """One packed forward over continuation chunks (one of a single position) and fresh prompts (one of a single
    position, one shorter than the conv history) leaves every row as forwards of one chunk each do: linear
    states, KV and MTP KV in the row's own blocks, last hidden, length."""
    from pipo.engine.decoding import PrefillChunk

    model = pipo_model("qwen3_5") if method == "pipo" else qwen_regular[0]
    decoder = Engine(model, method, eos_token_ids=EOS, block_size=4, max_seq_len=40, max_batch_size=1,
                     prefill_rows=10, num_blocks=256).decoder
    w, n = decoder.unit_width, 5
    decoder.tables[1:] = torch.arange(1, 10 * decoder.max_blocks + 1).view(10, -1)  # rows 1-5 packed, 6-10 alone
    # each feed runs on past its chunks (a pipo prefill never runs a feed's last unit)
    prompts = [tuple(range(3 + 11 * i, 3 + 11 * i + w * (size + 1))) for i, size in enumerate((9, 1, 7, 12, 2))]
    earlier, chunks = [(0, 0, 5), (3, 0, 3)], [(0, 5, 6), (1, 0, 1), (2, 0, 7), (3, 3, 12), (4, 0, 2)]
    for step in (earlier, chunks):
        decoder.prefill([PrefillChunk(1 + i, prompts[i], lo, hi) for i, lo, hi in step])
        for i, lo, hi in step:
            decoder.prefill([PrefillChunk(1 + n + i, prompts[i], lo, hi)])
    packed, alone = torch.arange(1, 1 + n), torch.arange(1 + n, 1 + 2 * n)
    torch.testing.assert_close(decoder.h_last[packed], decoder.h_last[alone])
    assert decoder.lengths[packed].tolist() == decoder.lengths[alone].tolist() == [6, 1, 7, 12, 2]
    for stack in (decoder.backbone, decoder.mtp):
        for state in stack.states:
            if state.rec is not None:
                torch.testing.assert_close(state.conv[packed], state.conv[alone])
                torch.testing.assert_close(state.rec[packed], state.rec[alone])
            else:  # every block the rows wrote (the MTP head's entries stop one before the backbone's)
                torch.testing.assert_close(state.k[decoder.tables[packed, :3]], state.k[decoder.tables[alone, :3]])
                torch.testing.assert_close(state.v[decoder.tables[packed, :3]], state.v[decoder.tables[alone, :3]])


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_prefill_attention_matches_masked_sdpa(kv_heads):
    """Prefill attention over packed sequences (no mask, one sequence's keys at a time) against SDPA with an
    explicit mask over each sequence's gathered blocks: sequences that start at position 0 and after cached keys
    (mid-block, at a block boundary), different lengths, 4 query heads over fewer K/V heads."""
    from pipo.engine.stack import Spans, prefill_attention

    torch.manual_seed(0)
    heads, d, bs = 4, 8, 4
    starts, counts, offsets = (0, 5, 8, 0), (6, 3, 6, 2), (0, 6, 9, 15, 17)
    pool_k, pool_v = torch.randn(2, 12, kv_heads, bs, d).unbind(0)  # keys before `starts` are what the pool holds
    tables = torch.tensor([[3, 7, 0, 0], [5, 2, 0, 0], [1, 4, 6, 11], [8, 0, 0, 0]])
    q = torch.randn(1, offsets[-1], heads, d).transpose(1, 2)  # the layout attention_inputs yields
    k, v = torch.randn(2, 1, offsets[-1], kv_heads, d).transpose(2, 3).unbind(0)
    sequence = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    positions = torch.cat([torch.arange(start, start + count) for start, count in zip(starts, counts)])
    blocks = tables[sequence, positions // bs]  # as _attention writes a packed prefill's keys
    pool_k[blocks, :, positions % bs] = k[0].transpose(0, 1)
    pool_v[blocks, :, positions % bs] = v[0].transpose(0, 1)
    spans = Spans(starts, offsets, torch.tensor(offsets), sequence)
    out = prefill_attention(q, k, v, pool_k, pool_v, tables, spans, d**-0.5)
    for i in range(len(starts)):
        new = slice(offsets[i], offsets[i + 1])
        keys = pool_k[tables[i]].transpose(0, 1).reshape(kv_heads, -1, d).repeat_interleave(heads // kv_heads, 0)
        values = pool_v[tables[i]].transpose(0, 1).reshape(kv_heads, -1, d).repeat_interleave(heads // kv_heads, 0)
        mask = torch.arange(keys.shape[1])[None] <= positions[new, None]
        expected = torch.nn.functional.scaled_dot_product_attention(q[0, :, new], keys, values, attn_mask=mask,
                                                                    scale=d**-0.5)
        torch.testing.assert_close(out[0, :, new], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_packed_conv_matches_each_sequences_own_conv(bias):
    """The packed prefill's causal conv (gathered windows over the sequences' histories and inputs) against
    conv1d + SiLU over each sequence's history and inputs on its own, and the new histories against their last
    K-1 inputs: sequences shorter than the history, of one input, and longer."""
    from types import SimpleNamespace

    from pipo.engine.stack import Spans, conv_indices, packed_conv

    torch.manual_seed(0)
    taps, heads, dim = 4, 2, 3
    channels = 3 * heads * dim
    conv1d = torch.nn.Conv1d(channels, channels, taps, groups=channels, bias=bias)
    mod = SimpleNamespace(conv1d=conv1d, key_dim=heads * dim, value_dim=heads * dim, head_k_dim=dim, head_v_dim=dim)
    counts = (5, 1, 2, 9)
    offsets = tuple(sum(counts[:i]) for i in range(len(counts) + 1))
    sequence = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    spans = Spans((0,) * len(counts), offsets, torch.tensor(offsets), sequence)
    history = torch.randn(len(counts), taps - 1, channels)
    mixed = torch.randn(1, offsets[-1], channels)
    with torch.no_grad():
        q, k, v, kept = packed_conv(SimpleNamespace(linear_attn=mod), mixed, history, *conv_indices(spans, taps - 1))
        for i, count in enumerate(counts):
            window = torch.cat([history[i], mixed[0, offsets[i] : offsets[i + 1]]])  # [K-1+T, C]
            expected = torch.nn.functional.silu(conv1d(window.t()[None]))[0].t()  # [T, C]
            got = torch.cat([t[0, offsets[i] : offsets[i + 1]].flatten(1) for t in (q, k, v)], dim=1)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kept[i], window[-(taps - 1):])


def test_counter_based_draws_keep_the_laws():
    """Counter-based noise: the race samples p, and speculative acceptance with it emits tokens distributed as p."""
    from pipo.engine import speculative_accept
    from pipo.model.sampling import derive_seed, row_uniforms, sample_probs, seed32

    trials = 40000
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.2, 0.3, 0.2, 0.1]])
    q = torch.tensor([0.05, 0.05, 0.3, 0.3, 0.2, 0.1])
    seeds = torch.tensor([seed32(derive_seed(3, j)) for j in range(trials)])
    counters = torch.full((trials,), 7)
    drafts = sample_probs(q.expand(trials, 6), row_uniforms(seeds, counters, 1, 6))
    accepted, bonus = speculative_accept(p.expand(trials, 2, 6), q.expand(trials, 1, 6), drafts[:, None],
                                         uniforms=row_uniforms(seeds, counters, 64, 1),
                                         residual_uniforms=row_uniforms(seeds, counters, 65, 6))
    for law, tokens in ((q, drafts), (p[0], torch.where(accepted == 1, drafts, bonus))):
        freq = torch.bincount(tokens, minlength=6).float() / trials
        assert (freq - law).abs().sum() / 2 < 0.01  # total variation; ~0.004 expected at this sample size


@TRITON_ON_CPU
@pytest.mark.parametrize(
    ("dtype", "d", "block_v", "warps", "strided"),
    [(torch.float32, 16, 8, 1, False), (torch.bfloat16, 32, 64, 4, True), (torch.float32, 24, 16, 2, True)],
)  # 2 tiles / 1 / ragged; q, k, v as head views of one conv output's rows (what the engine passes) or contiguous
def test_delta_decode_kernel_matches_torch(dtype, d, block_v, warps, strided):
    """The Triton decode step of the gated delta rule against the torch recurrent path, grouped value heads,
    several tokens in a row, each updating the fp32 state in place."""
    from pipo.engine import delta_decode, kernels

    batch, heads, v_heads = 3, 2, 4
    state = 0.1 * torch.randn(batch, v_heads, d, d)
    expected_state = state.clone()
    for _ in range(3):
        if strided:
            conv = torch.randn(batch, 1, (2 * heads + v_heads) * d + 8, dtype=dtype)  # 8 more channels per row
            q, k, v = torch.split(conv[..., :-8], [heads * d, heads * d, v_heads * d], dim=-1)
            q, k, v = q.view(batch, 1, heads, d), k.view(batch, 1, heads, d), v.view(batch, 1, v_heads, d)
        else:
            q, k = torch.randn(2, batch, 1, heads, d, dtype=dtype)
            v = torch.randn(batch, 1, v_heads, d, dtype=dtype)
        g = -torch.nn.functional.softplus(torch.randn(batch, 1, v_heads))  # fp32 log decay, as the engine's
        beta = torch.rand(batch, 1, v_heads, dtype=dtype)
        out = delta_decode.decode_step(q, k, v, g, beta, state, state, block_v, warps)
        expected = kernels.recurrent_delta_rule(q, k, v, g, beta, expected_state)
        assert out.dtype == expected.dtype == dtype
        rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the same fp32 sum, rounded apart by at most 1 ulp
        torch.testing.assert_close(out.float(), expected.float(), atol=1e-5, rtol=rtol)
        torch.testing.assert_close(state, expected_state, atol=1e-6, rtol=1e-5)
    final = torch.zeros_like(state)
    before = state.clone()
    delta_decode.decode_step(q, k, v, g, beta, state, final, block_v, warps)
    kernels.recurrent_delta_rule(q, k, v, g, beta, expected_state)
    assert torch.equal(state, before)  # a separate final state leaves the initial one untouched
    torch.testing.assert_close(final, expected_state, atol=1e-6, rtol=1e-5)


@TRITON_ON_CPU
@pytest.mark.parametrize(("dtype", "steps", "bias"), [(torch.float32, 1, False), (torch.bfloat16, 1, True),
                                                     (torch.float32, 3, True)])
def test_conv_decode_kernel_matches_torch(dtype, steps, bias):
    """The Triton conv step against the torch path (window, `_causal_conv`, SiLU, history = the window's tail):
    new inputs as a strided slice of a wider projection, history rows of a larger slot buffer updated in place,
    channels not a multiple of the kernel's block."""
    from pipo.engine import conv_decode
    from pipo.engine.stack import _causal_conv

    batch, taps, channels = 3, 4, conv_decode.BLOCK_CHANNELS + 44
    slots = torch.randn(batch + 2, taps - 1, channels, dtype=dtype)
    history = slots[1 : batch + 1]
    projection = torch.randn(batch, steps, channels + 10, dtype=dtype)
    x = projection[..., 5 : 5 + channels]
    weight = torch.randn(channels, 1, taps, dtype=dtype)
    b = torch.randn(channels, dtype=dtype) if bias else None
    window = torch.cat([history, x], dim=1).float()
    expected = torch.nn.functional.silu(_causal_conv(window, weight.float(), None if b is None else b.float(), steps))
    untouched = (slots[0].clone(), slots[-1].clone())
    out = conv_decode.conv_step(x, history, weight, b)
    assert out.shape == (batch, steps, channels) and out.dtype == dtype
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the same fp32 sum, rounded once
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=atol)
    assert torch.equal(history, window[:, -(taps - 1):].to(dtype))
    assert torch.equal(slots[0], untouched[0]) and torch.equal(slots[-1], untouched[1])  # other slots stay


def test_delta_decode_refuses_a_state_it_would_misread():
    from pipo.engine import delta_decode

    q = torch.zeros(2, 1, 1, 8)
    v, gate = torch.zeros(2, 1, 2, 8), torch.zeros(2, 1, 2)
    transposed = torch.zeros(2, 2, 8, 8).transpose(2, 3)
    with pytest.raises(ValueError, match=r"initial state must be contiguous fp32 \(2, 2, 8, 8\)"):
        delta_decode.decode_step(q, q, v, gate, gate, transposed, transposed, 8, 1)


def test_recurrent_launch_config_is_timed_once_per_shape_and_never_while_capturing(monkeypatch):
    """A recurrent kernel's launch config: timed on first use of a shape, then cached per kernel; a shape first
    seen inside a CUDA-graph capture (where timing is impossible) gets the kernel's default and stays untimed."""
    from pipo.engine import kernels

    timed = []
    monkeypatch.setattr(kernels, "_CONFIGS", {})
    monkeypatch.setattr(kernels, "_time_configs",
                        lambda launch, configs, k, v, dtype: timed.append((configs, k)) or configs[-1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    ours, theirs = ((64, 4), (32, 1)), kernels.LAUNCH_CONFIGS
    shape, other = (4, 1, 2, 8), (8, 1, 2, 8)
    assert kernels._launch_config(None, ours, shape, shape, torch.bfloat16) == (32, 1)
    assert kernels._launch_config(None, ours, shape, shape, torch.bfloat16) == (32, 1)
    assert kernels._launch_config(None, theirs, shape, shape, torch.bfloat16) == theirs[-1]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert kernels._launch_config(None, ours, shape, shape, torch.bfloat16) == (32, 1)
    assert kernels._launch_config(None, ours, other, other, torch.bfloat16) == (64, 4)
    assert kernels._launch_config(None, theirs, other, other, torch.bfloat16) == theirs[0]
    assert timed == [(ours, shape), (theirs, shape)]


@pytest.mark.parametrize("method", ["regular", "pipo"])
def test_prompts_prefill_ahead_of_free_slots_together(qwen_regular, pipo_model, method):
    """With every decode slot taken, the next waiting prompts are prefilled ahead, several per forward, and left
    in the prefix cache; their samples start from it without a forward of their own. Outputs stay exact."""
    prompts = distinct_prompts(8)
    if method == "pipo":
        model = pipo_model("qwen3_5")
        expected = [generate_pipo_reference(model, p, NEW, GREEDY, 0.5, EOS).raw_ids for p in prompts]
    else:
        model = qwen_regular[0]
        expected = [generate_regular_reference(qwen_regular[1], p, NEW, GREEDY, EOS).token_ids for p in prompts]
    engine = Engine(model, method, eos_token_ids=EOS, block_size=4, max_seq_len=40, max_batch_size=2,
                    prefill_chunk=8, prefill_rows=3, max_prefill_tokens=24)
    out = engine.generate(prompts, GREEDY, max_new_tokens=NEW, n=2)
    ids = [[c.raw_ids if method == "pipo" else c.token_ids for c in row] for row in out]
    assert ids == [[e, e] for e in expected]
    assert engine.metrics["prefills_ahead"] >= 3
    assert engine.metrics["prefill_forwards"] < len(prompts)  # each prompt prefilled once, several per forward
    assert engine.metrics["preemptions"] == 0
    check_no_leaks(engine)


def test_prefills_ahead_give_way_to_running_sequences(qwen_regular):
    """Prompts prefilled ahead hold pool blocks only while running sequences do not need them: a pool that
    cannot keep them evicts them (their samples then prefill on admission) or drops a job, never preempting
    for them; outputs stay exact and nothing leaks."""
    path, model, _ = qwen_regular
    prompts = distinct_prompts(6)
    expected = [generate_regular_reference(model, p, 24, GREEDY, EOS).token_ids for p in prompts]
    engine = Engine(path, "regular", eos_token_ids=EOS, block_size=4, max_seq_len=40, max_batch_size=2,
                    prefill_chunk=8, prefill_rows=2, max_prefill_tokens=16, num_blocks=16)
    park, copy_block, parked, copies = engine._park, engine.decoder.copy_block, [], []

    def park_and_count(job):  # a finished prefill ahead hands its own blocks to the cache: no copy, no eviction
        before = (engine.prefix_cache.evicted, len(copies))
        park(job)
        parked.append((engine.prefix_cache.evicted - before[0], len(copies) - before[1]))

    engine._park = park_and_count
    engine.decoder.copy_block = lambda *blocks: copies.append(blocks) or copy_block(*blocks)
    out = engine.generate(prompts, GREEDY, max_new_tokens=24, n=2)
    assert [[c.token_ids for c in row] for row in out] == [[e, e] for e in expected]
    assert parked and all(item == (0, 0) for item in parked)
    assert engine.metrics["prefills_ahead"] > 0 and engine.prefix_cache.evicted > 0
    assert engine.metrics["preemptions"] == 0
    check_no_leaks(engine)


@pytest.mark.parametrize("method", ["pipo", "eagle"])
def test_warm_prefill_leaves_no_trace(qwen_regular, pipo_model, method):
    """The warm-up prefill a CUDA engine runs at construction (every prefill row count once) changes no output."""
    model = pipo_model("qwen3_5") if method == "pipo" else qwen_regular[0]
    engine = tight_engine(model, method, **({"conf_threshold": 0.5} if method == "pipo" else {}))
    expected = engine.generate(PROMPTS[:3], GREEDY, max_new_tokens=NEW)
    engine.decoder.warm_prefill(list(range(engine.max_batch_size, engine.max_batch_size + TIGHT["prefill_rows"])))
    engine.prefix_cache.clear()  # the prompts prefill again, in the warmed rows
    again = engine.generate(PROMPTS[:3], GREEDY, max_new_tokens=NEW)
    assert [c[0].raw_ids for c in again] == [c[0].raw_ids for c in expected]
    check_no_leaks(engine)


def test_an_aborted_request_leaves_no_samples_waiting_on_its_cached_prompt(qwen_regular):
    """Aborting samples that wait for their cached prompt lowers its waiting count, so the entry becomes idle and
    prefills ahead, which count the samples the cache holds, go on for the next requests."""
    path, model, _ = qwen_regular
    engine = Engine(path, "regular", eos_token_ids=EOS, block_size=4, max_seq_len=40, max_batch_size=1,
                    prefill_chunk=8, prefill_rows=2, prefix_cache_size=0)
    engine.add_request("a", PROMPTS[0], GREEDY, max_new_tokens=NEW, n=3)
    engine.step()  # sample 0 prefills and runs; its prompt is cached for samples 1 and 2
    entry = engine.prefix_cache.entries[tuple(PROMPTS[0])]
    assert entry.waiting == 2
    engine.abort("a")
    assert entry.waiting == 0
    prompts = distinct_prompts(4)
    out = engine.generate(prompts, GREEDY, max_new_tokens=NEW)
    assert [c[0].token_ids for c in out] == [generate_regular_reference(model, p, NEW, GREEDY, EOS).token_ids
                                             for p in prompts]
    assert engine.metrics["prefills_ahead"] > 0
    check_no_leaks(engine)
