"""The real training stages on one GPU: peak memory, tokens/s, and OPD rollout figures, as one JSON file.

`small`: `pipo sft` -> `pipo merge` -> `pipo opd` -> `pipo merge` through ms-swift (the rules'
entry points, `pipo.train.stages`) on a small Qwen3.5-shaped model with the real head and
linear-attention dimensions, then a check that a reused rollout engine's CUDA graphs decode
weights changed after capture as a fresh engine does. `4b`: one SFT step and one OPD step at
`--tokens` through the same trainers, on a 4B-shaped student (and a 9B- or 4B-shaped teacher),
random weights. `write`: only the 4B and 9B
checkpoints (run it beside `small` to overlap the disk writes). The results file is rewritten
after every stage, so a run cut off by a time limit keeps what finished.

What is measured comes from light wrappers around the trainers, not from their logs:
trained tokens are the attention-mask sum of every student forward that builds a graph;
train time is `Trainer.train`; rollout time, slots and the check that training tensors
come back untouched wrap `generate_rollouts` as the OPD trainer calls it. Peak memory is
`torch.cuda.max_memory_allocated` over the stage (weights, optimizer state, rollout
caches and CUDA graphs included).

    python benchmarks/train_stages_bench.py --part small --out stages.json
    python benchmarks/train_stages_bench.py --part 4b --tokens 16384 --out big.json
"""
from __future__ import annotations

import argparse
import json
import random
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

from pipo.model.linear_attention import current_gated_delta_backend
from pipo.model.modeling import PIPOForCausalLM
from pipo.model.tiny import default_corpus, train_tokenizer

WORDS = "the answer is step compute so we get final result please reason by and put your within boxed".split()


@dataclass(frozen=True)
class Shape:
    """A Qwen3.5 text shape: every 4th layer full attention, the hub's head and linear-attention dims."""

    hidden: int
    intermediate: int
    layers: int
    tied: bool = True
    vocab: int = 0  # 0: the tokenizer's size

    def config(self, vocab: int, pad_id: int, eos_id: int) -> Qwen3_5TextConfig:
        return Qwen3_5TextConfig(
            vocab_size=self.vocab or vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=16, num_key_value_heads=4, head_dim=256,
            linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
            layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(self.layers)],
            max_position_embeddings=262144, tie_word_embeddings=self.tied, pad_token_id=pad_id, eos_token_id=eos_id,
            bos_token_id=None,
        )


SMALL_STUDENT = Shape(hidden=1024, intermediate=3072, layers=8)
SMALL_TEACHER = Shape(hidden=1536, intermediate=4096, layers=8, tied=False)
STUDENT_4B = Shape(hidden=2560, intermediate=9216, layers=32, vocab=248320)
TEACHER_9B = Shape(hidden=4096, intermediate=12288, layers=32, tied=False, vocab=248320)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_backbone(path: Path, shape: Shape, seed: int) -> Path:
    """A random Qwen3.5-shaped checkpoint (bf16 on GPU) with a tokenizer trained on the spot."""
    if (path / "config.json").is_file():
        return path
    tokenizer = train_tokenizer(default_corpus(), 384)
    tokenizer.model_max_length = 262144
    config = shape.config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device().type == "cuda" else torch.float32
    with device():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    staging = path.with_name(path.name + ".partial")  # renamed when whole: a cut-off write is never taken for one
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def text_of(tokenizer, tokens: int, rng: random.Random) -> str:
    """Words from the tokenizer's corpus, about `tokens` tokens long."""
    words = [rng.choice(WORDS) for _ in range(tokens)]
    per_word = len(tokenizer(" ".join(words[:512]))["input_ids"]) / 512
    return " ".join(words[: max(1, int(tokens / per_word))])


def write_rows(path: Path, tokenizer, n: int, prompt_tokens: int, answer_tokens: int, seed: int) -> Path:
    """`n` chat rows; with `answer_tokens` > 0 an assistant turn ends each (SFT), else prompts only (OPD)."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            messages = [{"role": "user", "content": text_of(tokenizer, prompt_tokens, rng)}]
            if answer_tokens:
                messages.append({"role": "assistant", "content": text_of(tokenizer, answer_tokens, rng) + "</think>\n\nthe answer is 4"})
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


@dataclass
class StageMeter:
    """What one stage did, gathered by the wrappers of `measured`."""

    trained_tokens: int = 0
    train_seconds: float = 0.0
    rollout_seconds: float = 0.0
    rollout_calls: int = 0
    rollout_slots: int = 0  # every emitted slot, rejected-draft PADs included
    rollout_tokens: int = 0  # visible tokens
    rollout_prompts: int = 0
    rollout_call_seconds: list[float] = field(default_factory=list)  # the first includes building the engine
    rollout_engine_builds: int = 0
    rollout_kv_pool_gib: float = 0.0
    training_tensors_intact: bool = True
    allocated_after_rollout_gib: list[float] = field(default_factory=list)
    allocated_before_rollout_gib: list[float] = field(default_factory=list)
    model_load_seconds: list[float] = field(default_factory=list)  # the PIPO loader's get_model, per student load


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _gib(value: int) -> float:
    return round(value / 2**30, 3)


def _signature(model: torch.nn.Module) -> list[tuple]:
    """Identity, dtype, device and storage of every parameter and gradient: what a rollout must leave alone."""
    return [
        (name, p.dtype, p.device, p.data_ptr(), None if p.grad is None else (p.grad.dtype, p.grad.data_ptr()))
        for name, p in model.named_parameters()
    ]


@contextmanager
def measured(meter: StageMeter) -> Iterator[None]:
    """Wrap the student forward, `Trainer.train` and the OPD trainer's rollouts for the duration."""
    import transformers
    from pipo.train import swift_models, swift_trainers

    forward, train, rollouts = PIPOForCausalLM.forward, transformers.Trainer.train, swift_trainers.generate_rollouts
    get_model = swift_models.PIPOModelLoader.get_model

    def counting_forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
        if torch.is_grad_enabled() and self.training and input_ids is not None:
            meter.trained_tokens += int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
        return forward(self, input_ids, attention_mask, *args, **kwargs)

    def timed_train(self, *args, **kwargs):
        _sync()
        start = time.perf_counter()
        try:
            return train(self, *args, **kwargs)
        finally:
            _sync()
            meter.train_seconds += time.perf_counter() - start

    def timed_rollouts(model, prompts, *args, **kwargs):
        before = _signature(model)
        _sync()
        if torch.cuda.is_available():
            meter.allocated_before_rollout_gib.append(_gib(torch.cuda.memory_allocated()))
        start = time.perf_counter()
        results = rollouts(model, prompts, *args, **kwargs)
        _sync()
        seconds = time.perf_counter() - start
        meter.rollout_seconds += seconds
        meter.rollout_call_seconds.append(round(seconds, 3))
        engine = kwargs.get("engine")
        if engine is not None:
            meter.rollout_engine_builds, meter.rollout_kv_pool_gib = engine.builds, _gib(engine.kv_bytes)
        if torch.cuda.is_available():
            meter.allocated_after_rollout_gib.append(_gib(torch.cuda.memory_allocated()))
        meter.rollout_calls += 1
        meter.rollout_prompts += len(prompts)
        meter.rollout_slots += sum(len(r.raw_ids) for r in results)
        meter.rollout_tokens += sum(len(r.token_ids) for r in results)
        meter.training_tensors_intact &= _signature(model) == before
        return results

    def timed_get_model(self, *args, **kwargs):
        start = time.perf_counter()
        model = get_model(self, *args, **kwargs)
        _sync()
        meter.model_load_seconds.append(round(time.perf_counter() - start, 2))
        print(json.dumps({"progress": "student loaded", "seconds": meter.model_load_seconds[-1]}), flush=True)
        return model

    PIPOForCausalLM.forward, transformers.Trainer.train = counting_forward, timed_train
    swift_trainers.generate_rollouts = timed_rollouts
    swift_models.PIPOModelLoader.get_model = timed_get_model
    try:
        yield
    finally:
        PIPOForCausalLM.forward, transformers.Trainer.train = forward, train
        swift_trainers.generate_rollouts = rollouts
        swift_models.PIPOModelLoader.get_model = get_model


def save(results: dict[str, Any]) -> None:
    """Write the results so far (atomically): a run cut off by a time limit still leaves every finished stage."""
    out = Path(results["args"]["out"])
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(results, indent=2))
    partial.replace(out)


def run_stage(name: str, call: Callable[[], Any], results: dict[str, Any]) -> Any:
    """Run one stage under the meter; its figures (or its error) go into `results[name]` and the results file."""
    meter = StageMeter()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps({"progress": f"{name} starts"}), flush=True)
    start = time.perf_counter()
    entry: dict[str, Any] = {}
    output = None
    try:
        with measured(meter):
            output = call()
        entry["ok"] = True
    except Exception as error:  # a failed stage is a result too; the next ones still run
        entry.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000], traceback=traceback.format_exc()[-4000:])
    entry["wall_seconds"] = round(time.perf_counter() - start, 2)
    entry.update(vars(meter))
    if meter.train_seconds:
        entry["train_tokens_per_s"] = round(meter.trained_tokens / meter.train_seconds, 1)
    if meter.rollout_calls:
        entry["rollout_slots_per_s"] = round(meter.rollout_slots / meter.rollout_seconds, 1)
        entry["rollout_tokens_per_s"] = round(meter.rollout_tokens / meter.rollout_seconds, 1)
        entry["rollout_share_of_train_time"] = round(meter.rollout_seconds / meter.train_seconds, 3)
        entry["train_tokens_per_s_excluding_rollouts"] = round(meter.trained_tokens / (meter.train_seconds - meter.rollout_seconds), 1)
    if torch.cuda.is_available():
        entry["peak_allocated_gib"] = _gib(torch.cuda.max_memory_allocated())
        entry["peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
    results[name] = entry
    save(results)
    print(json.dumps({name: {k: v for k, v in entry.items() if k != "traceback"}}), flush=True)
    if not entry["ok"]:
        print(entry["traceback"], flush=True)
    return output


def environment() -> dict[str, Any]:
    import importlib.metadata as metadata

    versions = {}
    for name in ("torch", "triton", "transformers", "ms-swift", "peft", "deepspeed", "flash-linear-attention", "tilelang", "trl"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    backend = current_gated_delta_backend()
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "versions": versions,
            "gated_delta_backend": backend.name, "gated_delta_reason": backend.reason,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def small(work: Path, args, results: dict[str, Any]) -> None:
    """sft -> merge -> opd -> merge on the small shape."""
    from transformers import AutoTokenizer

    from pipo.train.stages import run_merge, run_opd, run_sft

    student = write_backbone(work / "student", SMALL_STUDENT, 0)
    teacher = write_backbone(work / "teacher", SMALL_TEACHER, 1)
    tokenizer = AutoTokenizer.from_pretrained(student)
    sft_rows = write_rows(work / "sft.jsonl", tokenizer, args.sft_steps * args.batch, args.prompt_tokens, args.answer_tokens, 0)
    rl_rows = write_rows(work / "rl.jsonl", tokenizer, args.opd_steps * args.batch, args.prompt_tokens, 0, 1)
    common = {"model_type": "pipo_qwen3_5", "warmup_ratio": 0.0, "gradient_accumulation_steps": 1, "logging_steps": 1,
              "per_device_batch_size": args.batch, "save_steps": 10**6, "num_train_epochs": 1.0}
    if args.opd_only:  # OPD from the backbone, converted by the plugin's loader as SFT would
        merged = student
    else:
        sft = run_stage("sft", lambda: run_sft({**common, "model": str(student), "dataset": str(sft_rows),
                                                "output_dir": str(work / "sft"), "max_steps": args.sft_steps,
                                                "max_length": 2 * (args.prompt_tokens + args.answer_tokens) + 256}), results)
        if sft is None:
            return
        merged = run_stage("merge_sft", lambda: run_merge(str(sft), str(work / "pipo-sft")), results)
        if merged is None:
            return
    opd = run_stage("opd", lambda: run_opd({**common, "model": str(merged), "teacher": str(teacher), "dataset": str(rl_rows),
                                            "output_dir": str(work / "opd"), "max_steps": args.opd_steps,
                                            "max_length": 4 * args.prompt_tokens + 256,
                                            "max_completion_length": args.completion_tokens,
                                            "pipo": {"conf_threshold": args.conf_threshold}}), results)
    if opd is not None:
        run_stage("merge_opd", lambda: run_merge(str(opd), str(work / "pipo-opd")), results)
    if merged is not student:
        run_stage("graph_reuse", lambda: graph_reuse_check(Path(merged), results), results)


def graph_reuse_check(checkpoint: Path, results: dict[str, Any]) -> None:
    """On the GPU (CUDA graphs on): a reused `RolloutEngine` decodes weights changed in place after its capture
    exactly as a freshly built engine does (greedy), and the change does change the rollouts."""
    from pipo.model.sampling import GREEDY
    from pipo.train.student_rollout import RolloutEngine, generate_rollouts

    model = PIPOForCausalLM.from_pretrained(str(checkpoint), dtype=torch.bfloat16, device_map=device()).eval()
    prompts = [[5 + (7 * i + j) % 300 for j in range(40 + 9 * i)] for i in range(4)]
    engine = RolloutEngine()

    def decode(with_engine):
        return [r.raw_ids for r in generate_rollouts(model, prompts, 64, GREEDY, 0.5, [], 0, engine=with_engine)]

    before = decode(engine)
    with torch.no_grad():
        for layer in model.model.layers:
            projection = layer.linear_attn.out_proj if hasattr(layer, "linear_attn") else layer.self_attn.o_proj
            projection.weight.mul_(-1.5)
        model.confidence_head.fc2.weight.mul_(4.0)
    start = time.perf_counter()
    reused = decode(engine)
    reused_seconds = time.perf_counter() - start
    fresh = decode(None)
    results["graph_reuse_detail"] = {
        "reused_equals_fresh": reused == fresh, "changed_by_update": reused != before, "builds": engine.builds,
        "graphs_captured": bool(engine.engine.decoder.graphs_enabled), "reused_rollout_seconds": round(reused_seconds, 3)}
    if reused != fresh or reused == before or engine.builds != 1:
        raise RuntimeError(f"graph reuse check failed: {results['graph_reuse_detail']}")


def write_all(work: Path, args, results: dict[str, Any]) -> None:
    """Only write the 4B student and the 9B teacher (to overlap the disk writes with another part's run)."""
    for name, shape, seed in (("student4b", STUDENT_4B, 0), ("teacher9b", TEACHER_9B, 1)):
        start = time.perf_counter()
        write_backbone(work / name, shape, seed)
        results[f"write_{name}_seconds"] = round(time.perf_counter() - start, 1)
        save(results)
        print(json.dumps({"progress": f"{name} written", "seconds": results[f"write_{name}_seconds"]}), flush=True)


def big(work: Path, args, results: dict[str, Any]) -> None:
    """One SFT and one OPD step at `--tokens` through the real trainers on the 4B student (9B or 4B teacher)."""
    from transformers import AutoTokenizer

    from pipo.train.stages import run_sft

    student = write_backbone(work / "student4b", STUDENT_4B, 0)
    tokenizer = AutoTokenizer.from_pretrained(student)
    one_step = {"model_type": "pipo_qwen3_5", "warmup_ratio": 0.0, "gradient_accumulation_steps": 1, "logging_steps": 1,
                "per_device_batch_size": 1, "save_steps": 10**6, "max_steps": 1}
    if args.sft_tokens:
        answer = args.sft_tokens - args.prompt_tokens - 64  # the template adds a few tokens; longer rows are dropped
        sft_rows = write_rows(work / f"sft{args.sft_tokens}.jsonl", tokenizer, 1, args.prompt_tokens, answer, 0)
        run_stage(f"sft_4b_{args.sft_tokens}", lambda: run_sft({
            **one_step, "model": str(student), "dataset": str(sft_rows), "output_dir": str(work / f"sft4b_{args.sft_tokens}"),
            "max_length": args.sft_tokens}), results)
    if args.opd_completion:
        opd_step(work, args, results, student, tokenizer, one_step)


def opd_step(work: Path, args, results: dict[str, Any], student: Path, tokenizer, one_step: dict[str, Any]) -> None:
    """One OPD step at `--opd-tokens` (prompt + `--opd-completion`) through the real trainer."""
    from pipo.train.stages import run_opd

    teacher = write_backbone(work / "teacher9b", TEACHER_9B, 1) if args.teacher == "9b" else student
    tokens = args.opd_tokens
    rl_rows = write_rows(work / f"rl{tokens}.jsonl", tokenizer, 1, tokens - args.opd_completion - 64, 0, 1)
    run_stage(f"opd_4b_{tokens}_teacher_{args.teacher}", lambda: run_opd({**one_step, "model": str(student), "teacher": str(teacher),
                                                        "dataset": str(rl_rows), "output_dir": str(work / f"opd4b_{tokens}"),
                                                        "max_length": tokens, "max_completion_length": args.opd_completion,
                                                        "pipo": {"conf_threshold": args.conf_threshold}}), results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["small", "4b", "write"], required=True)
    parser.add_argument("--work", default="/tmp/pipo_stages", help="checkpoints and data (large for 4b)")
    parser.add_argument("--out", required=True, help="JSON file of the results")
    parser.add_argument("--batch", type=int, default=4, help="small: per-device batch (rows or rollouts)")
    parser.add_argument("--sft-steps", type=int, default=20)
    parser.add_argument("--opd-steps", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--answer-tokens", type=int, default=768)
    parser.add_argument("--opd-only", action="store_true", help="small: skip SFT, run OPD (and merge) from the backbone")
    parser.add_argument("--completion-tokens", type=int, default=256, help="small: OPD max_completion_length")
    parser.add_argument("--conf-threshold", type=float, default=0.95, help="OPD rollouts (< 0 keeps every draft)")
    parser.add_argument("--tokens", type=int, default=16384, help="4b: tokens of the SFT and the OPD step")
    parser.add_argument("--sft-tokens", type=int, default=None, help="4b: tokens of the SFT step (default --tokens; 0: none)")
    parser.add_argument("--opd-tokens", type=int, default=None, help="4b: prompt + completion of the OPD step (default --tokens)")
    parser.add_argument("--opd-completion", type=int, default=2048, help="4b: OPD completion tokens (0: no OPD step)")
    parser.add_argument("--teacher", choices=["9b", "4b"], default="9b", help="4b: OPD teacher (4b: the student's backbone)")
    args = parser.parse_args()
    args.sft_tokens = args.tokens if args.sft_tokens is None else args.sft_tokens
    args.opd_tokens = args.opd_tokens or args.tokens
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": environment(), "args": vars(args)}
    print(json.dumps(results), flush=True)
    save(results)
    {"small": small, "4b": big, "write": write_all}[args.part](work, args, results)
    failed = [name for name, entry in results.items() if isinstance(entry, dict) and entry.get("ok") is False]
    raise SystemExit(f"failed stages: {failed}" if failed else 0)


if __name__ == "__main__":
    main()
