"""Serving benchmark (issue 8): a reasoning-rollout workload through the paged engine, random Qwen3.5-4B-shaped weights.

256 prompts of 512-2K random tokens, n = 4 samples each, output lengths log-normal (median
`--median`, capped at `--cap`), EOS ignored so lengths are as drawn. For `regular` and `pipo`
(tau < 0) the engine runs the workload for `--seconds` of wall time after a warm-up (until
every slot runs, then until `--age-tokens` more output tokens are out) and reports output
tokens/s, peak memory, mean and max sequences in flight, their mean KV entries, preemptions and
the prefix-block hit rate, next to (a) the static-slot reservation of the engine before paging:
the same engine limited to the batch that reserving `--static-len` tokens per slot allows, and
(b) the bytes-per-step bound: weights + KV actually read + linear states read and written, per
step, over the measured copy bandwidth, summed over the steps the run made.
Also builds the engine at the paper's settings (eval: batch 32 x 163840 on the 4B shape;
rollout: batch 64 x 135168 on a 9B shape) and runs a few steps on each.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

from benchmarks.engine_bench import PAD, copy_bandwidth, nbytes, qwen35_4b_config
from pipo.engine import Engine
from pipo.engine.engine import slot_state_bytes
from pipo.engine.kernels import fla_ops
from pipo.engine.stack import kv_bytes_per_block
from pipo.model.config import PIPOConfig
from pipo.model.modeling import PIPOForCausalLM
from pipo.model.sampling import SamplingParams

GiB = 2**30


def qwen35_9b_config() -> Qwen3_5TextConfig:
    """Qwen3.5-9B's text shape (the rollout teacher), random weights."""
    return Qwen3_5TextConfig(
        vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
        num_attention_heads=16, num_key_value_heads=4, head_dim=256, linear_num_key_heads=16,
        linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(32)],
        tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=248046, max_position_embeddings=262144,
    )


def workload(prompts: int, median: int, cap: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Prompt token ids (512-2K tokens) and per-sample output lengths (log-normal, sigma 1, capped)."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, 240000, int(rng.integers(512, 2049))).tolist() for _ in range(prompts)]
    lengths = np.minimum(cap, np.maximum(16, rng.lognormal(np.log(median), 1.0, prompts * 4))).astype(int)
    return ids, lengths.tolist()


def step_bound_bytes(engine: Engine, weights: int, per_position: int, state_rw: int) -> int:
    """Bytes the step just queued must move: weights + each running sequence's KV + its linear states."""
    return weights + sum(s.length for s in engine.running.values()) * per_position + len(engine.running) * state_rw


class DeviceTime:
    """Sums the device time of one method's calls (CUDA events around each call, read at the end): where
    a step's time goes between decode steps, prefill forwards and first-token sampling."""

    def __init__(self, obj, name: str) -> None:
        self.pairs: list = []
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self.pairs.append((start, end))
            return out

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.pairs.clear()

    def total_ms(self) -> float:
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.pairs)


def run_workload(engine: Engine, prompts, lengths, seconds: float, weights: int, bandwidth: float,
                 fill: bool = True, age_tokens: int = 0) -> dict:
    """Feed the workload, step for `seconds`, and report throughput against the bytes bound.

    `fill`: the window starts once every slot runs and no prompt is prefilling (the regime of
    most of a whole run), not during the first wave of admissions, whose prefill a short
    window would otherwise mostly measure. `age_tokens`: output tokens more before the window, so
    that it sees the longer contexts of a steady state, not sequences that all started together;
    counted in tokens, not seconds, so that every method's window sees the same population (a
    sequence's length in tokens is drawn, so the same requests have finished)."""
    dec = engine.decoder
    layers = list(engine.parts.base.layers) + (list(engine.parts.mtp.layers) if engine.parts.mtp is not None else [])
    per_position = kv_bytes_per_block(layers, dec.block_size, engine.dtype) // dec.block_size
    state_rw = 2 * slot_state_bytes(engine.parts, engine.method, 1, engine.dtype)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20)
    for i, ids in enumerate(prompts):
        for j in range(4):
            engine.add_request(f"{i}.{j}", ids, params, max_new_tokens=lengths[4 * i + j], seed=i * 4 + j)
    torch.cuda.reset_peak_memory_stats()
    timers = {name: DeviceTime(dec, name) for name in ("step", "prefill", "first")}
    warm = 0  # warm-up: compilation of new shapes, and (unless `fill` is off) the first wave of prefills
    while warm < 20 or fill and warm < 2000 and (engine.prefilling or len(engine.running) < engine.max_batch_size):
        engine.step()
        warm += 1
    aged = 0
    while engine.has_unfinished() and aged < age_tokens:
        aged += sum(len(update.token_ids) for update in engine.step())
    torch.cuda.synchronize()
    engine.metrics.clear()
    for timer in timers.values():
        timer.reset()
    tokens, bound_s, entries, running, start = 0, 0.0, 0, 0, time.perf_counter()
    while engine.has_unfinished() and time.perf_counter() - start < seconds:
        for update in engine.step():
            tokens += len(update.token_ids)
        if engine.running:
            bound_s += step_bound_bytes(engine, weights, per_position, state_rw) / bandwidth
            entries += sum(s.length for s in engine.running.values())
            running += len(engine.running)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    steps = max(1, engine.metrics["steps"])
    row = {
        "tok_s": tokens / wall, "bound_tok_s": tokens / bound_s if bound_s else float("nan"),
        "peak_GiB": torch.cuda.max_memory_allocated() / GiB, "mean_in_flight": engine.metrics["running_sum"] / steps,
        "max_in_flight": engine.metrics["running_max"], "preemptions": engine.metrics["preemptions"],
        "mean_kv_entries": entries / max(1, running),  # per running sequence and step (PIPO: pairs)
        "prefix_hit_rate": engine.prefix_cache.hit_rate, "steps": steps, "wall_s": wall, "tokens": tokens,
        "num_blocks": engine.num_blocks, "max_batch": engine.max_batch_size,
        "decode_ms_per_step": timers["step"].total_ms() / steps, "prefill_ms": timers["prefill"].total_ms(),
        "first_ms": timers["first"].total_ms(), "prefill_forwards": engine.metrics["prefill_forwards"],
        "prefill_tokens": engine.metrics["prefill_tokens"], "prefill_rows_max": engine.metrics["prefill_rows_max"],
        "prefills_ahead": engine.metrics["prefills_ahead"], "prefix_evictions": engine.prefix_cache.evicted,
    }
    row["share_of_bound"] = row["tok_s"] / row["bound_tok_s"]
    for request in list(engine.requests):
        engine.abort(request)
    while engine.has_unfinished():
        engine.step()
    return row


def static_batch(engine_kv_per_token: int, state: int, budget: float, static_len: int) -> int:
    """The batch a static reservation of `static_len` tokens per slot fits in `budget` bytes."""
    return max(1, min(256, int(budget // (static_len * engine_kv_per_token + state))))


def paged_budget(engine: Engine) -> tuple[int, int]:
    """The paged `regular` engine's KV pool bytes and one slot's state bytes: what the static engine's
    reservation gets, so that both hold the same memory."""
    layers = list(engine.parts.base.layers)
    return (engine.num_blocks * kv_bytes_per_block(layers, engine.decoder.block_size, engine.dtype),
            slot_state_bytes(engine.parts, "regular", 1, engine.dtype))


def construct(model, method: str, batch: int, max_seq_len: int, **opts) -> dict:
    """Build the engine at a paper setting, run a few short requests, report memory."""
    start = time.perf_counter()
    engine = Engine(model, method, max_batch_size=batch, max_seq_len=max_seq_len, eos_token_ids=[], **opts)
    built = time.perf_counter() - start
    out = engine.generate([[5] * 600] * 4, SamplingParams(), max_new_tokens=16, n=2)
    row = {"method": method, "batch": batch, "max_seq_len": max_seq_len, "build_s": built, "num_blocks": engine.num_blocks,
           "pool_GiB": engine.num_blocks * kv_bytes_per_block(list(engine.parts.base.layers), engine.decoder.block_size,
                                                               engine.dtype) / GiB,
           "ok": all(len(c.token_ids) == 16 for r in out for c in r),
           "allocated_GiB": torch.cuda.memory_allocated() / GiB}
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--median", type=int, default=4096)
    parser.add_argument("--cap", type=int, default=32768)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--static-len", type=int, default=32768)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--methods", default="regular,static,pipo",
                        help="comma-separated (static: the slot reservation of the engine before paging, in the "
                        "paged regular engine's memory); empty: construction only")
    parser.add_argument("--construct", default="eval,rollout")
    parser.add_argument("--age-tokens", type=int, default=0,
                        help="output tokens after the fill before the window (a steady state's longer contexts)")
    parser.add_argument("--no-fill", action="store_true", help="start the window after 20 warm-up steps, "
                        "during the first wave of admissions (the 2026-12-01 tables)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = qwen35_4b_config(args.layers)
    cfg.max_position_embeddings = 262144
    with torch.device("cuda"):
        causal_lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        pipo = PIPOForCausalLM(PIPOConfig(text_config=cfg.to_dict(), compressor_type="mlp", pad_token_id=PAD))
    pipo = pipo.to(torch.bfloat16).eval()
    pipo.model = causal_lm.model
    pipo.lm_head = causal_lm.lm_head
    bandwidth = copy_bandwidth()
    info = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "bandwidth_TBps": bandwidth / 1e12, "fla": fla_ops() is not None, "torch": torch.__version__,
            "workload": vars(args)}
    print(json.dumps(info), flush=True)
    prompts, lengths = workload(args.prompts, args.median, args.cap)
    lm = nbytes(causal_lm.lm_head)
    body = nbytes(causal_lm.model.layers) + nbytes(causal_lm.model.norm)
    weights = {"regular": body + lm,
               "pipo": body + 2 * lm + nbytes(pipo.mtp) + nbytes(pipo.compressor) + nbytes(pipo.confidence_head)}
    weights["static"] = weights["regular"]
    rows, budget = {}, None
    max_seq_len = args.cap + 2048 + 64
    for method in filter(None, args.methods.split(",")):
        model, kind, slots, opts = causal_lm, method, args.max_batch, {}
        if method == "pipo":
            model, opts = pipo, {"conf_threshold": -1.0}
        elif method == "static":
            if budget is None:
                budget = paged_budget(Engine(causal_lm, "regular", max_batch_size=args.max_batch,
                                           max_seq_len=max_seq_len, eos_token_ids=[]))
                gc.collect()
                torch.cuda.empty_cache()
            kv, state = budget
            per_token = kv_bytes_per_block(list(causal_lm.model.layers), 1, torch.bfloat16)
            kind, slots = "regular", static_batch(per_token, state, kv + args.max_batch * state, args.static_len)
        engine = Engine(model, kind, max_batch_size=slots, max_seq_len=max_seq_len, eos_token_ids=[], **opts)
        if method == "regular":
            budget = paged_budget(engine)
        rows[method] = run_workload(engine, prompts, lengths, args.seconds, weights[method], bandwidth,
                                    not args.no_fill, args.age_tokens)
        print(method, json.dumps(rows[method]), flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    if "regular" in rows and "static" in rows:
        rows["regular_over_static"] = rows["regular"]["tok_s"] / rows["static"]["tok_s"]
    if "regular" in rows and "pipo" in rows:
        rows["pipo_over_regular"] = rows["pipo"]["tok_s"] / rows["regular"]["tok_s"]
        rows["pipo_over_regular_bound"] = rows["pipo"]["bound_tok_s"] / rows["regular"]["bound_tok_s"]
    settings = []
    if "eval" in args.construct:
        settings.append(construct(causal_lm, "regular", 32, 163840))
        print(json.dumps(settings[-1]), flush=True)
    del causal_lm, pipo
    gc.collect()
    torch.cuda.empty_cache()
    if "rollout" in args.construct:
        with torch.device("cuda"):
            teacher = AutoModelForCausalLM.from_config(qwen35_9b_config(), dtype=torch.bfloat16).eval()
        settings.append(construct(teacher, "regular", 64, 135168))
        print(json.dumps(settings[-1]), flush=True)
    print(json.dumps({"info": info, "rows": rows, "construct": settings}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "rows": rows, "construct": settings}, f, indent=1)


if __name__ == "__main__":
    main()
