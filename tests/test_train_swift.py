"""PIPO training through ms-swift on tiny CPU models: SFT, merge, OPD, resume, the `swift` CLI (cache: test_train_cache)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("swift")

from pipo import PIPOForCausalLM  # noqa: E402
from pipo.provenance import EXIT_AFTER_STEPS_ENV  # noqa: E402
from pipo.train.merge import load_adapter_model  # noqa: E402
from pipo.train.stages import PLUGIN, newest_checkpoint, run_merge, run_opd, run_sft  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = {"model_type": "pipo_tiny", "lora_rank": 8, "lora_alpha": 16, "warmup_ratio": 0.0, "max_length": 512,
        "gradient_accumulation_steps": 1, "logging_steps": 1}


def write_rows(path: Path, with_answer: bool, n: int = 16) -> Path:
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            messages = [{"role": "user", "content": f"{a} + {b} = ?"}]
            if with_answer:
                messages.append({"role": "assistant", "content": f"so we compute {a} + {b}</think>\n\nthe answer is \\boxed{{{a + b}}}"})
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return {"sft": write_rows(root / "sft.jsonl", True), "rl": write_rows(root / "rl.jsonl", False)}


@pytest.fixture(scope="module")
def sft_run(backbone_dir, data, tmp_path_factory):
    """A few SFT steps from the tiny llama backbone (converted to PIPO by the plugin's loader)."""
    out = tmp_path_factory.mktemp("sft")
    config = {**TINY, "model": str(backbone_dir("llama")), "dataset": str(data["sft"]), "output_dir": str(out),
              "max_steps": 6, "per_device_batch_size": 4, "learning_rate": 3e-3, "save_steps": 3}
    return run_sft(config), config


@pytest.fixture(scope="module")
def merged(sft_run, tmp_path_factory):
    return run_merge(str(sft_run[0]), str(tmp_path_factory.mktemp("merged") / "pipo"))


def _losses(checkpoint: Path) -> list[dict]:
    return [entry for entry in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"] if "loss" in entry]


def test_template_encodes_pair_layout_with_think_prefix_in_prompt(backbone_dir):
    import pipo.train.plugin  # noqa: F401  (registers the PIPO model types and templates)
    from swift.model import get_processor
    from swift.template import get_template

    model_dir = str(backbone_dir("llama"))
    processor = get_processor(model_dir, model_type="pipo_tiny")
    template = get_template(processor)
    template.set_mode("train")
    messages = [{"role": "user", "content": "1 + 2 = ?"}, {"role": "assistant", "content": "<think>\n1 + 2</think>\n\n3"}]
    encoded = template.encode({"messages": messages})
    ids, labels = encoded["input_ids"], encoded["labels"]
    start = next(i for i, label in enumerate(labels) if label != -100)
    tokenizer = processor
    assert len(ids) % 2 == 0 and start % 2 == 0
    assert tokenizer.decode(ids[:start]).replace(tokenizer.pad_token, "").endswith("assistant\n<think>\n")
    assert tokenizer.decode(ids[start:]).startswith("1 + 2</think>")
    with template.generate_context():
        prompt = template.encode({"messages": messages[:1]})["input_ids"]
    text = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    hf_prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt == hf_prompt + [tokenizer.pad_token_id] * (len(hf_prompt) % 2)
    assert ids[: len(prompt)] == prompt


def test_sft_lowers_loss_and_saves_lora_and_heads(sft_run):
    checkpoint, _ = sft_run
    logs = _losses(checkpoint)
    assert logs[-1]["loss"] < logs[0]["loss"]
    for key in ("backbone_loss", "mtp_loss", "conf_loss", "conf_mean_pred", "conf_mean_target"):
        assert key in logs[0]
    from safetensors.torch import load_file

    keys = load_file(str(checkpoint / "adapter_model.safetensors")).keys()
    assert any("lora_A" in k and "mtp.layers.0" in k for k in keys)
    assert any("lora_A" in k and "model.layers.0.self_attn.q_proj" in k for k in keys)
    for module in ("compressor.", "confidence_head.", "mtp.fc.", "mtp.pre_fc_norm_embedding.", "mtp.pre_fc_norm_hidden.", "mtp.norm."):
        assert any(module in k for k in keys), module


def test_merge_gives_the_adapter_model_logits(sft_run, merged):
    ids = torch.tensor([[5, 9, 17, 30, 41, 2, 8, 13]])
    adapter = load_adapter_model(sft_run[0], torch.float32).eval()
    model = PIPOForCausalLM.from_pretrained(str(merged)).float().eval()
    with torch.no_grad():
        expected = adapter(input_ids=ids, output_pair_states=True)
        got = model(input_ids=ids, output_pair_states=True)
        torch.testing.assert_close(got.hidden_states, expected.hidden_states, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.mtp_hidden_states, expected.mtp_hidden_states, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.confidence_logits, expected.confidence_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(ids).logits, adapter(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert (merged / "tokenizer_config.json").is_file()


def test_rerun_of_a_finished_stage_returns_its_checkpoint(sft_run):
    checkpoint, config = sft_run
    assert run_sft(config) == checkpoint


def compacted_by_hand(ids: torch.Tensor, mask: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's view of a rollout batch, one token at a time: PADs and padding dropped, right-padded with PAD;
    each student position mapped to the teacher position of the last real token at or before it."""
    rows, index = [], torch.zeros_like(ids)
    for b in range(ids.shape[0]):
        kept = -1
        rows.append([])
        for t in range(ids.shape[1]):
            if mask[b, t] and ids[b, t] != pad:
                rows[b].append(int(ids[b, t]))
                kept += 1
            index[b, t] = max(kept, 0)
    width = max(len(r) for r in rows)
    compact = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    compact_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return compact, compact_mask, index


def rejected_drafts(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, pad: int) -> int:
    """PADs in a token2 slot of the response with a real token after them (not the PAD that evens a row's end)."""
    count = 0
    for b in range(ids.shape[0]):
        real = [t for t in range(ids.shape[1]) if mask[b, t] and ids[b, t] != pad]
        start = next(t for t in range(ids.shape[1]) if labels[b, t] != -100)
        count += sum(1 for t in range(start + 1, real[-1], 2) if ids[b, t] == pad)  # start: a pair boundary
    return count


@pytest.mark.parametrize("divergence,threshold", [("sampled", -1.0), ("topk", 0.5), ("full", 0.5)])
def test_opd_first_step_loss_equals_the_loss_recomputed_from_its_batch(divergence, threshold, merged, backbone_dir,
                                                                      data, tmp_path, monkeypatch):
    """The trainer's logged step-1 loss against `opd_losses` on the same rollout batch, with the student (the merged
    SFT model: LoRA starts as a no-op) and the teacher run here; at threshold 0.5 the rollouts hold rejected drafts."""
    from transformers import AutoModelForCausalLM

    from pipo.train import student_rollout, swift_trainers
    from pipo.train.opd import opd_losses

    def no_reference(*args, **kwargs):
        raise AssertionError("OPD rollouts fell back to the reference generator")

    batches = []

    def recording_opd_losses(*args, **kwargs):
        batches.append(args[6].detach().clone())  # labels
        return opd_losses(*args, **kwargs)

    inputs = []
    real_compact = swift_trainers.compact_pads
    monkeypatch.setattr(swift_trainers, "compact_pads", lambda ids, mask, pad: inputs.append((ids.clone(), mask.clone())) or real_compact(ids, mask, pad))
    monkeypatch.setattr(swift_trainers, "opd_losses", recording_opd_losses)
    monkeypatch.setattr(student_rollout, "reference_rollouts", no_reference)  # rollouts come from the batched engine
    teacher_dir = backbone_dir("llama", hidden_size=96)
    settings = {"divergence": divergence, "conf_threshold": threshold, "topk": 4}
    config = {**TINY, "model": str(merged), "teacher": str(teacher_dir), "dataset": str(data["rl"]), "lora_dropout": 0.0,
              "output_dir": str(tmp_path / "opd"), "max_steps": 2, "per_device_batch_size": 2, "learning_rate": 1e-3,
              "save_steps": 2, "max_completion_length": 16, "beta": 0.5 if divergence == "full" else 1.0, "pipo": settings}
    logs = _losses(run_opd(config))
    assert len(logs) == 2
    for key in ("opd_backbone_loss", "opd_mtp_loss", "opd_conf_loss", "opd_conf_mean_pred", "opd_conf_mean_target"):
        assert key in logs[0], key

    student = PIPOForCausalLM.from_pretrained(str(merged)).float().eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).float().eval()
    (ids, mask), labels, pad = inputs[0], batches[0], student.pad_token_id
    assert (rejected_drafts(ids, mask, labels, pad) > 0) == (threshold >= 0), "0.5 should reject some drafts, -1 none"
    compact, compact_mask, source_index = compacted_by_hand(ids, mask, pad)
    with torch.no_grad():
        states = student(input_ids=ids, attention_mask=mask, output_pair_states=True)
        teacher_hidden = teacher.model(input_ids=compact, attention_mask=compact_mask).last_hidden_state
        expected = opd_losses(states.hidden_states, states.mtp_hidden_states, states.confidence_logits,
                              student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels, source_index,
                              divergence=divergence, k=4, beta=config["beta"])
    assert logs[0]["loss"] == pytest.approx(float(expected.loss), abs=2e-4, rel=1e-3)
    assert logs[0]["opd_conf_mean_target"] == pytest.approx(float(expected.conf_mean_target), abs=2e-4, rel=1e-3)


@pytest.fixture(scope="module")
def opd_run(merged, backbone_dir, data, tmp_path_factory):
    """A few OPD steps from the merged SFT model at threshold 0.5 (rollouts with rejected drafts), rollouts logged."""
    out = tmp_path_factory.mktemp("opd")
    config = {**TINY, "model": str(merged), "teacher": str(backbone_dir("llama", hidden_size=96)),
              "dataset": str(data["rl"]), "output_dir": str(out), "max_steps": 4, "per_device_batch_size": 2,
              "learning_rate": 1e-3, "save_steps": 2, "max_completion_length": 16,
              "pipo": {"divergence": "topk", "conf_threshold": 0.5, "topk": 4},
              "extra_args": ["--log_completions", "true"]}
    return run_opd(config), config


SFT_LOGGED = ("loss", "backbone_loss", "mtp_loss", "conf_loss", "conf_mean_target")
OPD_LOGGED = ("loss", "opd_backbone_loss", "opd_mtp_loss", "opd_conf_loss", "opd_conf_mean_target")
# stage -> (uninterrupted run fixture, stage runner, kill after step, checkpoint kept, metrics compared per step)
RESUME_CASES = {
    "sft": ("sft_run", run_sft, 5, "checkpoint-3", SFT_LOGGED),  # steps 4 (logged) and 5 (not) are redone
    "opd": ("opd_run", run_opd, 4, "checkpoint-2", OPD_LOGGED),  # step 3 (logged, rollouts too) and 4 are redone
}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _close_to(rows: list[dict]) -> list[dict]:
    """`rows` with each float compared to rtol 1e-4 (a resumed run may sum in another order: last bits differ)."""
    return [{k: pytest.approx(v, rel=1e-4, abs=1e-6) if isinstance(v, float) else v for k, v in row.items()}
            for row in rows]


@pytest.mark.parametrize("stage", sorted(RESUME_CASES))
def test_killed_run_resumes_to_the_uninterrupted_run(stage, request, tmp_path):
    """The uninterrupted run's settings in another folder, ended abruptly after a step past a checkpoint (before that
    step's log and checkpoint), then resumed: the same adapter weights, per-step metrics and logged rows (ms-swift's
    `logging.jsonl`; OPD: the rollouts in `completions.jsonl`) as the uninterrupted run."""
    fixture, run_stage, kill_after, kept_name, metrics = RESUME_CASES[stage]
    reference, base = request.getfixturevalue(fixture)
    out = tmp_path / stage
    config = {**base, "output_dir": str(out)}
    config_path = tmp_path / f"{stage}.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", EXIT_AFTER_STEPS_ENV: str(kill_after)}
    killed = subprocess.run([sys.executable, "-m", "pipo.cli", stage, "--config", str(config_path)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == 75, killed.stderr[-3000:]
    kept = newest_checkpoint(out)
    assert kept.name == kept_name
    saved_at = (kept / "adapter_model.safetensors").stat().st_mtime_ns
    final = run_stage(config)  # the same settings and inputs: resumes
    assert (kept / "adapter_model.safetensors").stat().st_mtime_ns == saved_at  # resumed, not retrained
    assert final.name == reference.name == f"checkpoint-{base['max_steps']}"
    assert json.loads((out / "pipo_stage.json").read_text())["resumed_from"] == [kept_name]
    from safetensors.torch import load_file

    got, expected = (load_file(str(c / "adapter_model.safetensors")) for c in (final, reference))
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    logs, expected_logs = ([{k: e[k] for k in ("step", *metrics)} for e in _losses(c)] for c in (final, reference))
    assert [e["step"] for e in logs] == list(range(1, base["max_steps"] + 1))
    assert logs == _close_to(expected_logs)
    logged = ("global_step/max_steps", *metrics)
    rows, expected_rows = ([{k: e.get(k) for k in logged} for e in _jsonl(d / "logging.jsonl")]
                           for d in (out, reference.parent))
    assert rows == _close_to(expected_rows)
    rollouts, expected_rollouts = (_jsonl(d / "completions.jsonl") for d in (out, reference.parent))
    assert rollouts == expected_rollouts and len(rollouts) == (base["max_steps"] if stage == "opd" else 0)


def test_swift_command_line_with_the_plugin(backbone_dir, data, tmp_path):
    out = tmp_path / "cli"
    command = [str(Path(sys.executable).with_name("swift")), "sft", "--external_plugins", str(PLUGIN), "--model", str(backbone_dir("qwen3_5", num_layers=2)),
               "--model_type", "pipo_tiny", "--dataset", str(data["sft"]), "--check_model", "false", "--tuner_type", "lora",
               "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
               "--output_dir", str(out), "--add_version", "false", "--torch_dtype", "float32", "--fp16", "false",
               "--report_to", "none", "--split_dataset_ratio", "0", "--gradient_checkpointing", "false",
               "--dataloader_num_workers", "0", "--save_steps", "2"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the plugin finds `pipo` on its own
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    args = json.loads((out / "checkpoint-2" / "args.json").read_text())
    assert args["external_plugins"] == [str(PLUGIN)] and args["model_type"] == "pipo_tiny"
