"""OPD rollouts go through the batched engine and equal the reference generator on a LoRA-wrapped student."""
from __future__ import annotations

import weakref
from functools import partial

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pipo.engine import Engine
from pipo.model.sampling import GREEDY, SamplingParams
from pipo.train import student_rollout
from pipo.train.merge import peft_ready
from pipo.train.stages import LORA_TARGETS, MODULES_TO_SAVE

EOS = [2]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], list(range(30, 64)), [100]]
NEW = 12


def lora_student(pipo_model, arch: str) -> torch.nn.Module:
    """A PIPO student as the OPD trainer holds it: PEFT LoRA (non-zero) + `modules_to_save`, training mode."""
    model = peft_ready(pipo_model(arch))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=list(LORA_TARGETS),
                                            modules_to_save=list(MODULES_TO_SAVE)))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
        # varied confidence decisions: some drafts kept, some turned into PAD
        peft.base_model.model.confidence_head.modules_to_save["default"].fc2.weight.normal_(0, 2.0)
    return peft.train()


def rollouts(generate, student, params=GREEDY, tau=0.5, seed=0, prompts=PROMPTS):
    return generate(student, prompts, NEW, params, tau, EOS, seed)


@pytest.mark.parametrize("arch", ["qwen3_5", "llama"])
def test_engine_rollouts_equal_reference_on_lora_student(pipo_model, arch):
    student = lora_student(pipo_model, arch).base_model.model
    expected = rollouts(student_rollout.reference_rollouts, student.eval())
    student.train()
    got = rollouts(student_rollout.generate_rollouts, student)
    assert student.training  # the trainer's mode comes back
    assert [r.raw_ids for r in got] == [r.raw_ids for r in expected]
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.finished for r in got] == [r.finished for r in expected]
    assert any(student.config.pad_token_id in r.raw_ids for r in got)  # rejected drafts kept as PADs
    assert any(len(r.raw_ids) > 2 and student.config.pad_token_id not in r.raw_ids[:2] for r in got)


def test_rollouts_take_the_engine_and_leave_mixed_dtype_weights_untouched(pipo_model, monkeypatch):
    """fp64 adapters and buffers on an fp32 base (like PEFT's fp32 LoRA on bf16): exact after the engine's cast."""
    student = lora_student(pipo_model, "qwen3_5").base_model.model
    for name, param in student.named_parameters():
        if "lora_" in name:
            param.data = param.data.double()
            param.grad = torch.randn_like(param.data)  # accumulated over earlier micro-steps
    student.model.rotary_emb.inv_freq = student.model.rotary_emb.inv_freq.double()
    before = {k: v.clone() for k, v in student.state_dict(keep_vars=True).items()}
    grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    param_ids = {k: id(p) for k, p in student.named_parameters()}
    expected = rollouts(student_rollout.reference_rollouts, student.eval())

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference generator ran instead of the engine")

    monkeypatch.setattr(student_rollout, "reference_rollouts", no_reference)
    got = rollouts(student_rollout.generate_rollouts, student.train())
    assert [r.raw_ids for r in got] == [r.raw_ids for r in expected]
    after = student.state_dict(keep_vars=True)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    for name, param in student.named_parameters():
        if "lora_" in name:
            assert param.grad.dtype == torch.float64 and torch.equal(param.grad, grads[name]), name
    assert student.model.rotary_emb.inv_freq.dtype == torch.float64
    assert {k: id(p) for k, p in student.named_parameters()} == param_ids  # the optimizer's parameters


def test_sampled_rollouts_are_reproducible_per_seed(pipo_model):
    student = lora_student(pipo_model, "llama").base_model.model
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5)
    first = rollouts(student_rollout.generate_rollouts, student, params, seed=3)
    assert [r.raw_ids for r in rollouts(student_rollout.generate_rollouts, student, params, seed=3)] == [r.raw_ids for r in first]
    assert [r.raw_ids for r in rollouts(student_rollout.generate_rollouts, student, params, seed=4)] != [r.raw_ids for r in first]


def test_model_on_several_devices_uses_the_reference():
    class TwoDevices(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(1, 1)
            self.b = torch.nn.Linear(1, 1, device="meta")

    assert "one device" in student_rollout.engine_unsupported(TwoDevices())
    assert student_rollout.engine_unsupported(torch.nn.Linear(1, 1)) is None


def test_one_engine_across_steps_decodes_the_updated_weights(pipo_model, monkeypatch):
    """Two OPD steps: the engine is built once, and the second rollout is the updated model's, as a fresh engine gives.

    The updates are what trainers do between rollouts: in place on shared tensors (a base
    weight), in place on tensors the engine keeps its own copy of (fp64 LoRA weights, decoded
    in fp32), and a parameter rebound to new storage. A prompt cached by the first step (it was
    repeated) must not serve the second: its KV and states are the old weights'.
    """
    student = lora_student(pipo_model, "qwen3_5").base_model.model
    for name, param in student.named_parameters():
        if "lora_" in name:
            param.data = param.data.double()
    built = []

    class CountedEngine(Engine):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(student_rollout, "Engine", CountedEngine)
    engine = student_rollout.RolloutEngine()

    batch = [PROMPTS[1], PROMPTS[1], PROMPTS[2]]  # a repeated prompt leaves a prefix-cache entry behind

    def step(model):
        return rollouts(partial(student_rollout.generate_rollouts, engine=engine), model, prompts=batch)

    first = step(student.train())
    first_engine = engine.engine
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name or "confidence_head" in name:
                param.add_(torch.randn_like(param) * 0.5)
        student.model.layers[0].linear_attn.in_proj_qkv.weight.mul_(3.0)
        q_proj = next(layer for layer in student.model.layers if hasattr(layer, "self_attn")).self_attn.q_proj.base_layer.weight
        q_proj.data = q_proj.data * -2.0
    second = step(student)
    assert engine.builds == 1 and engine.engine is first_engine and len(built) == 1
    assert student.training and q_proj.dtype == torch.float32
    fresh = rollouts(student_rollout.generate_rollouts, student, prompts=batch)  # a one-off engine on the same weights
    assert len(built) == 2
    assert [r.raw_ids for r in second] == [r.raw_ids for r in fresh]
    assert [r.raw_ids for r in second] != [r.raw_ids for r in first]


def test_engine_grows_for_a_longer_batch_and_is_rebuilt_for_another_threshold(pipo_model, monkeypatch):
    monkeypatch.setattr(student_rollout, "LENGTH_STEP", 16)
    student = lora_student(pipo_model, "llama").base_model.model
    engine = student_rollout.RolloutEngine()
    student_rollout.generate_rollouts(student, PROMPTS[:2], 4, GREEDY, 0.5, EOS, 0, engine=engine)
    rows, length = engine.engine.max_batch_size, engine.engine.max_seq_len
    student_rollout.generate_rollouts(student, PROMPTS[:1], 4, GREEDY, 0.5, EOS, 0, engine=engine)
    assert engine.builds == 1  # fewer rows fit
    got = student_rollout.generate_rollouts(student, PROMPTS + [list(range(5, 75))], 4, GREEDY, 0.5, EOS, 0, engine=engine)
    assert engine.builds == 2 and engine.engine.max_batch_size == 5 > rows
    assert engine.engine.max_seq_len == 80 > length  # 70 + 2 x 4, rounded up to 16
    assert len(got) == 5
    student_rollout.generate_rollouts(student, PROMPTS[:1], 4, GREEDY, 0.9, EOS, 0, engine=engine)
    assert engine.builds == 3 and engine.engine.decoder.config.conf_threshold == 0.9


def test_a_rebuilt_engine_frees_the_old_one_first(pipo_model, monkeypatch):
    """The old engine (KV pool, CUDA graphs) is gone before the bigger one allocates: never both at once."""
    student = pipo_model("llama")
    engine = student_rollout.RolloutEngine()
    student_rollout.generate_rollouts(student, PROMPTS[:1], 4, GREEDY, 0.5, EOS, 0, engine=engine)
    old = weakref.ref(engine.engine)
    alive_at_build = []

    class Probe(Engine):
        def __init__(self, *args, **kwargs):
            alive_at_build.append(old() is not None)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(student_rollout, "Engine", Probe)
    student_rollout.generate_rollouts(student, PROMPTS[:3], 4, GREEDY, 0.5, EOS, 0, engine=engine)
    assert engine.builds == 2 and alive_at_build == [False]
