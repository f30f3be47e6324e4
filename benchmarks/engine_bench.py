"""Engine decode benchmark on a Qwen3.5-4B-shaped model with random bf16 weights (issue 3).

Per batch size and context: ms per decode step, tokens/s and TTFT for `regular`, `pipo`
(every draft kept, tau < 0), `eagle` and Hugging Face `generate`, next to each method's
memory-traffic floor (bytes one step must read / measured device-to-device bandwidth).
Decode steps are timed on caches positioned at the context length (their contents do
not change the work), so long contexts need no long prefill; TTFT is a real prefill of
one prompt. Run on a GPU: `python benchmarks/engine_bench.py --out results.json`.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

from pipo.engine import Engine, build_native_mtp
from pipo.engine.kernels import fla_ops
from pipo.engine.sequence import Sequence, StopStrings
from pipo.model.config import PIPOConfig
from pipo.model.modeling import PIPOForCausalLM
from pipo.model.sampling import SamplingMode, SamplingParams

PAD = 248044


def qwen35_4b_config(layers: int) -> Qwen3_5TextConfig:
    return Qwen3_5TextConfig(
        vocab_size=248320, hidden_size=2560, intermediate_size=9216, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, head_dim=256, linear_num_key_heads=16,
        linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
        tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=248046, max_position_embeddings=65536,
    )


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus written."""
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 20 / (time.perf_counter() - start)


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def step_bytes(method: str, cfg, pipo: PIPOForCausalLM, batch: int, ctx: int, k: int) -> float:
    """Bytes one decode step must read: weights (LM head per pass), KV cache, linear states (read + write)."""
    lm = cfg.vocab_size * cfg.hidden_size * 2
    body = nbytes(pipo.model.layers) + nbytes(pipo.model.norm)
    mtp = nbytes(pipo.mtp)
    full = sum(t == "full_attention" for t in cfg.layer_types)
    linear = cfg.num_hidden_layers - full
    kv_entry = 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V, bf16
    state = 2 * 4 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim  # fp32 r+w
    if method == "pipo":
        entries = ctx // 2
        weights = body + 2 * lm + mtp + nbytes(pipo.compressor) + nbytes(pipo.confidence_head)
        return weights + batch * (kv_entry * entries * (full + 1) + state * linear)
    if method == "eagle":  # k MTP passes (layer + LM head) per verify pass
        weights = body + lm + k * (mtp + lm)
        return weights + batch * (kv_entry * ctx * (full + k) + state * linear * (k + 1))
    return body + lm + batch * (kv_entry * ctx * full + state * linear)


def place(engine: Engine, batch: int, ctx: int, params: SamplingParams = SamplingParams()) -> dict[int, Sequence]:
    """Sequences in slots [0, batch) positioned at context `ctx`, each with the KV blocks it reads and writes,
    sampling with `params` (values do not change a step's work; the transforms they ask for do)."""
    dec = engine.decoder
    dec.set_mode(SamplingMode.of([params]))
    units = ctx // dec.unit_width
    seqs = {}
    for slot in range(batch):
        seq = Sequence(0, slot, [1] * ctx, tuple([1] * ctx), 10**9, frozenset(), StopStrings(None, ()))
        seq.start()
        seq.length = units
        seq.blocks = engine.pool.take(-(-min(units + 2 * dec.room, dec.capacity) // dec.block_size))
        dec.tables[slot, : len(seq.blocks)] = torch.tensor(seq.blocks, device=dec.device)
        dec.set_row(slot, params, slot)
        seqs[slot] = seq
    dec.lengths[:batch] = units
    return seqs


def time_steps(engine: Engine, batch: int, ctx: int, steps: int,
               params: SamplingParams = SamplingParams()) -> tuple[float, float]:
    """Seconds per decode step and tokens emitted per step, every slot active at context `ctx`."""
    dec = engine.decoder
    units = ctx // dec.unit_width
    seqs = place(engine, batch, ctx, params)
    in_flight = None
    for i in range(steps + 3):
        if i == 3:
            in_flight.finish()  # as Engine.generate: step t+1 is queued before step t is emitted
            in_flight = None
            torch.cuda.synchronize()
            start = time.perf_counter()
        launched = dec.step(batch, seqs)
        dec.lengths[:batch] = units  # keep positions fixed: the step's work stays that of context `ctx`
        if in_flight is not None:
            in_flight.finish()
        for seq in seqs.values():
            seq.length = units
        in_flight = launched
    in_flight.finish()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / steps
    emitted = sum(s.stats.emitted_tokens for s in seqs.values()) / (steps + 3)
    for seq in seqs.values():
        engine.pool.release(seq.blocks)
    dec.tables.zero_()
    return per_step, emitted


def profile_steps(engine: Engine, batch: int, ctx: int, path: str, steps: int = 5,
                  params: SamplingParams = SamplingParams()) -> str:
    """Kernel table (sorted by GPU time) of `steps` decode steps, written to `path`; returns a short summary.

    The summary compares the GPU time of the kernels with the wall time, so launch gaps
    and host work between steps show as the difference.
    """
    time_steps(engine, batch, ctx, 2, params)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        wall, _ = time_steps(engine, batch, ctx, steps, params)
    events = prof.key_averages()
    table = events.table(sort_by="self_device_time_total", row_limit=60)
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / (steps + 3)
    launches = sum(e.count for e in kernels) / (steps + 3)
    with open(path, "w") as f:
        f.write(table)
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]
    lines = [f"  {e.self_device_time_total / 1e3 / (steps + 3):7.3f} ms x{e.count / (steps + 3):5.0f}  {e.key[:90]}"
             for e in top]
    return "\n".join([f"wall {1e3 * wall:.2f} ms/step, kernels {gpu_ms:.2f} ms/step, {launches:.0f} kernels/step",
                       *lines])


def ttft(engine: Engine, ctx: int, warmups: int = 2, repeats: int = 3) -> float:
    """Best of `repeats` prefills after `warmups` (new prefill shapes compile on first use)."""
    prompt = torch.randint(0, 240000, (ctx - 1,)).tolist()
    engine.prefix_cache.capacity = 0
    engine.prefix_cache.clear()
    for _ in range(warmups):
        engine.generate([prompt], max_new_tokens=1)
    torch.cuda.synchronize()
    return min(engine.generate([prompt], max_new_tokens=1)[0][0].stats.ttft_s for _ in range(repeats))


def hf_generate_tps(causal_lm, batch: int, ctx: int, new: int = 16) -> float:
    ids = torch.randint(0, 240000, (batch, ctx), device="cuda")
    causal_lm.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    causal_lm.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=True)
    torch.cuda.synchronize()
    return batch * new / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--contexts", default="512,8192,32768")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eagle-k", type=int, default=3)
    parser.add_argument("--ttft-contexts", default="8192,32768")
    parser.add_argument("--hf-contexts", default="512", help="contexts at which HF generate runs")
    parser.add_argument("--methods", default="regular,pipo,eagle")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile-dir", default=None, help="write kernel tables of steps at --profile-batches here")
    parser.add_argument("--profile-batches", default="1")
    parser.add_argument("--top-p", type=float, default=1.0, help="sampling of the timed steps (temperature 1)")
    parser.add_argument("--top-k", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = qwen35_4b_config(args.layers)
    with torch.device("cuda"):
        causal_lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        pipo = PIPOForCausalLM(PIPOConfig(text_config=cfg.to_dict(), compressor_type="mlp", pad_token_id=PAD))
    pipo = pipo.to(torch.bfloat16).eval()
    pipo.model = causal_lm.model  # one backbone in memory, shared by every method
    pipo.lm_head = causal_lm.lm_head
    native_mtp = build_native_mtp(causal_lm, pipo.mtp.state_dict(), "random")
    bandwidth = copy_bandwidth()
    info = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "bandwidth_TBps": bandwidth / 1e12, "fla": fla_ops() is not None, "torch": torch.__version__}
    print(json.dumps(info))
    params = SamplingParams(temperature=1.0, top_p=args.top_p, top_k=args.top_k)
    rows = []
    for batch in map(int, args.batches.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            row = {"batch": batch, "ctx": ctx}
            for method in args.methods.split(","):
                model, opts = (pipo, {"conf_threshold": -1.0}) if method == "pipo" else (causal_lm, {})
                floor = step_bytes(method, cfg, pipo, batch, ctx, args.eagle_k) / bandwidth
                row[method] = {"floor_ms": 1e3 * floor}
                try:
                    engine = Engine(model, method, mtp_head=native_mtp if method == "eagle" else None,
                                    max_batch_size=batch, max_seq_len=ctx + 64, eagle_k=args.eagle_k,
                                    prefix_cache_size=0, eos_token_ids=[], **opts)
                    sec, tokens = time_steps(engine, batch, ctx, args.steps, params)
                    if args.profile_dir and str(batch) in args.profile_batches.split(","):
                        path = f"{args.profile_dir}/profile_{method}_b{batch}_{ctx}.txt"
                        print(f"profile {method} b{batch} ctx {ctx}:",
                              profile_steps(engine, batch, ctx, path, params=params), flush=True)
                    row[method].update(ms_step=1e3 * sec, tok_s=tokens / sec, vs_floor=sec / floor)
                    if batch == 1 and str(ctx) in args.ttft_contexts.split(",") and method != "eagle":
                        row[method]["ttft_s"] = ttft(engine, ctx)
                except torch.OutOfMemoryError as error:
                    print(f"OOM {method} b{batch} ctx {ctx}: {str(error)[:300]}; allocated "
                          f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB, peak {torch.cuda.max_memory_allocated() / 2**30:.1f}")
                    row[method].update(ms_step=float("nan"), tok_s=float("nan"), vs_floor=float("nan"), error="OOM")
                engine = None
                gc.collect()
                torch.cuda.empty_cache()
                print(json.dumps(row), f"allocated {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
            if str(ctx) in args.hf_contexts.split(","):
                row["hf"] = {"tok_s": hf_generate_tps(causal_lm, batch, ctx)}
            if "pipo" in row and "regular" in row:
                row["pipo_over_regular"] = row["pipo"]["tok_s"] / row["regular"]["tok_s"]
                row["limit"] = 2 * row["regular"]["floor_ms"] / row["pipo"]["floor_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| batch | ctx | method | ms/step | floor ms | step/floor | tok/s | TTFT s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for method in args.methods.split(","):
            r = row[method]
            print(f"| {row['batch']} | {row['ctx']} | {method} | {r['ms_step']:.2f} | {r['floor_ms']:.2f} | "
                  f"{r['vs_floor']:.2f} | {r['tok_s']:.0f} | {r.get('ttft_s', float('nan')):.3f} |")
        hf = row.get("hf", {}).get("tok_s", float("nan"))
        print(f"| {row['batch']} | {row['ctx']} | HF generate | | | | {hf:.1f} | |")
        if "limit" in row:
            print(f"| {row['batch']} | {row['ctx']} | pipo/regular tok/s {row['pipo_over_regular']:.2f} "
                  f"(limit {row['limit']:.2f}) | | | | | |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
