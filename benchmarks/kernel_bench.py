"""Kernel micro-benchmark (issue 8): the decode step's gated delta rule and the sampler's top-k at 256 rows.

Gated delta rule, one decode token per row (default Qwen3.5-4B's linear attention: 16 key / 32 value heads of
128 x 128; bf16 q/k/v, fp32 state updated in place): a copy of the state (its bytes read and written once,
the floor), flash-linear-attention's fused recurrent kernel at its timed launch config (when installed), and
our kernel (`pipo/engine/delta_decode.py`) at its timed config and at every config it tries.
Top-k over bf16 logits [rows, vocab] (default 256 x 248,320, k = 32): torch.topk, `sampling.top_k`'s group
prefilter at a few group sizes (its values checked equal to torch.topk's), and argmax (one read: the floor);
the prefilter's group maxima alone, Triton (`pipo/model/group_max.py`, at a few logits-per-program blocks) against
torch's reshape-amax; and the sampler's top-k plus greedy token (`sample_rows`'s read of the logits under a top-k) "before",
today's `top_k` with torch's group maxima plus a separate argmax (close to, not exactly, the code before the
Triton maxima), and now, Triton group maxima with the argmax derived from them. Since the Triton maxima,
`top_k_us_by_group` times them too: compare it with older JSON results only knowing that. The prefilter's second
stage on its candidates, torch.topk against the sort it runs; and a whole `sample_rows` (serving_bench's
top-k 20, top-p 0.95) replayed as a CUDA graph, eager against `fused` (its stretches compiled, as the engine runs it).
Paged decode attention (`pipo/engine/flash_decode.py`, Qwen3.5-4B's 4 KV heads of 256, 4 query heads each)
over rows of mixed lengths, at its default chunks per row and at forced ones.
Times from `triton.testing.do_bench` (median, L2 flushed). Run on a GPU, a few seconds:
`python benchmarks/kernel_bench.py [--out kernels.json]`; prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
from unittest import mock

import torch
from triton.testing import do_bench

from pipo.engine import delta_decode, flash_decode, kernels
from pipo.engine.graphs import GraphedFn
from pipo.model import group_max
from pipo.model.sampling import TOP_K_GROUP, RowNoise, RowParams, SamplingMode, SamplingParams, sample_rows, top_k


def micros(fn) -> float:
    return do_bench(fn, warmup=10, rep=50) * 1e3


def delta_rule(rows: int, heads: int, v_heads: int, d: int) -> dict:
    """us per decode step of each delta-rule kernel, and the state copy's."""
    q, k = torch.randn(2, rows, 1, heads, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(rows, 1, v_heads, d, device="cuda", dtype=torch.bfloat16)
    g = -torch.rand(rows, 1, v_heads, device="cuda")
    beta = torch.rand(rows, 1, v_heads, device="cuda", dtype=torch.bfloat16)
    state = 0.1 * torch.randn(rows, v_heads, d, d, device="cuda")
    copy = torch.empty_like(state)
    shapes = (tuple(k.shape), tuple(v.shape), q.dtype)
    ours = kernels._launch_config(delta_decode.decode_step, delta_decode.CONFIGS, *shapes)
    result = {"state_bytes_rw": 2 * state.numel() * 4, "copy_us": micros(lambda: copy.copy_(state)),
              "ours_config": list(ours),
              "ours_us": micros(lambda: delta_decode.decode_step(q, k, v, g, beta, state, state, *ours)),
              "ours_us_by_config": {f"{bv}x{w}": micros(lambda c=(bv, w): delta_decode.decode_step(
                  q, k, v, g, beta, state, state, *c)) for bv, w in delta_decode.CONFIGS}}
    ops = kernels.fla_ops()
    if ops is not None:
        launch = functools.partial(kernels._launch, ops[1])
        fla = kernels._launch_config(launch, kernels.LAUNCH_CONFIGS, *shapes)
        result["fla_config"] = list(fla)
        result["fla_us"] = micros(lambda: launch(q, k, v, g, beta, state, state, *fla))
    return result


def paged_attention(rows: int, kv_heads: int, group: int, d: int, capacity: int, lengths: dict[str, tuple[int, int]],
                    splits: list[int]) -> dict:
    """us and TB/s of the paged decode attention (one query per row, blocks of 32) per row-length mix
    (lengths uniform in [lo, hi]) at the default chunks and at forced chunks per row; the bytes are the
    KV the rows hold. Its floor is the copy bandwidth (`delta_rule`'s state copy)."""
    block_size = 32
    per_row = capacity // block_size
    pool_k, pool_v = torch.randn(2, rows * per_row, kv_heads, block_size, d, device="cuda",
                                 dtype=torch.bfloat16).unbind(0)
    tables = torch.randperm(rows * per_row, device="cuda").view(rows, per_row)
    q = torch.randn(rows, kv_heads, group, d, device="cuda", dtype=torch.bfloat16)
    result = {}
    for name, (lo, hi) in lengths.items():
        positions = torch.randint(lo, hi + 1, (rows, 1), device="cuda") - 1
        nbytes = int(positions.sum() + rows) * kv_heads * d * 2 * 2
        run = functools.partial(flash_decode.paged_decode_attention, q, pool_k, pool_v, tables, positions, d**-0.5)
        times = {"default": micros(run), **{str(n): micros(lambda n=n: run(n_splits=n)) for n in splits}}
        default = flash_decode.chunk_count(rows, kv_heads, capacity, flash_decode.tile(block_size),
                                           flash_decode.multiprocessors())
        result[name] = {"bytes": nbytes, "default_splits": default, "us": times}
    return result


def topk(rows: int, vocab: int, k: int, groups: list[int], blocks: list[int]) -> dict:
    """us of torch.topk, `top_k` per group size, and argmax over bf16 logits; whether `top_k`'s values match;
    the group maxima, the sampler's read, the second stage and a whole sampling call (`group_maxima`,
    `sampler_read`, `candidates`, `sampler_graphs`)."""
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    expected = torch.topk(logits, k, dim=-1).values
    result = {"logit_bytes": logits.numel() * 2, "argmax_us": micros(lambda: logits.argmax(-1)),
              "torch_topk_us": micros(lambda: torch.topk(logits, k, dim=-1)), "top_k_us_by_group": {},
              "top_k_values_equal": True}
    for group in groups:
        result["top_k_us_by_group"][group] = micros(lambda g=group: top_k(logits, k, g))
        result["top_k_values_equal"] &= torch.equal(top_k(logits, k, group)[0], expected)
    result["top_k_us"] = result["top_k_us_by_group"].get(TOP_K_GROUP) or micros(lambda: top_k(logits, k))
    result.update(group_maxima(logits, blocks))
    result.update(sampler_read(logits, k))
    result.update(candidates(rows, k))
    result.update(sampler_graphs(logits))
    return result


def group_maxima(logits: torch.Tensor, blocks: list[int]) -> dict:
    """us of the prefilter's group maxima (groups of TOP_K_GROUP): torch's reshape-amax, Triton per block size."""
    expected = group_max.group_max_torch(logits, TOP_K_GROUP)
    result = {"group_max_torch_us": micros(lambda: group_max.group_max_torch(logits, TOP_K_GROUP)),
              "group_max_us": micros(lambda: group_max.group_max(logits, TOP_K_GROUP)),
              "group_max_us_by_block": {}, "group_max_equal": True}
    for block in blocks:
        run = functools.partial(group_max.group_max_triton, logits, TOP_K_GROUP, block)
        result["group_max_us_by_block"][block] = micros(run)
        result["group_max_equal"] &= torch.equal(run(), expected)
    return result


def sampler_read(logits: torch.Tensor, k: int) -> dict:
    """us of `sample_rows`'s top-k and greedy token: before (torch group maxima, then argmax) and now."""
    def before() -> tuple[torch.Tensor, ...]:
        return *top_k(logits, k), logits.argmax(-1)

    with mock.patch.object(group_max, "group_max", group_max.group_max_torch):
        before_us, expected = micros(before), before()
    now = top_k(logits, k, with_argmax=True)
    return {"sampler_before_us": before_us, "sampler_us": micros(lambda: top_k(logits, k, with_argmax=True)),
            "sampler_equal": all(torch.equal(a, b) for a, b in zip(now, expected))}


def candidates(rows: int, k: int) -> dict:
    """us of the prefilter's second stage on its k * TOP_K_GROUP candidates: torch.topk against a whole sort."""
    cands = torch.randn(rows, k * TOP_K_GROUP, device="cuda", dtype=torch.bfloat16)
    return {"candidates_topk_us": micros(lambda: torch.topk(cands, k, dim=-1)),
            "candidates_sort_us": micros(lambda: cands.sort(dim=-1, descending=True))}


def sampler_graphs(logits: torch.Tensor) -> dict:
    """us of a whole `sample_rows` as the engine runs it, replayed as a CUDA graph: serving_bench's parameters
    (temperature 1, top-p 0.95, top-k 20) on every row, eager and `fused` (compiled stretches); equal tokens?"""
    rows = logits.shape[0]
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=20)
    full = functools.partial(torch.full, (rows,), device="cuda")
    row = RowParams(full(1.0), full(0.95), full(20), full(0.0), full(0.0))
    noise = RowNoise(torch.arange(rows, device="cuda"), full(7), 0)
    result, tokens, every = {}, {}, slice(0, rows)
    for name in ("eager", "fused"):
        graphed = GraphedFn(lambda _rows, _kv_len, z, fused=name == "fused": sample_rows(
            z, row, SamplingMode.of([params]), noise, fused=fused))
        graphed.capture(every, 0, logits, share=True)
        tokens[name] = graphed.output(every, 0, logits)
        result[f"sample_rows_{name}_us"] = micros(lambda g=graphed: g(every, 0, logits))
    result["sample_rows_equal"] = torch.equal(tokens["eager"], tokens["fused"])
    return result


def rate(nbytes: int, us: float) -> str:
    return f"{us:8.1f} us  {nbytes / us / 1e6:5.2f} TB/s"


def report(delta: dict, tops: dict, attention: dict) -> None:
    """The table: each time with its bytes rate, and the ratios to the floors."""
    state_bytes, logit_bytes = delta["state_bytes_rw"], tops["logit_bytes"]
    copy_rate = state_bytes / delta["copy_us"]
    for name, mix in attention.items():
        for splits, us in mix["us"].items():
            label = f"{splits} ({mix['default_splits']})" if splits == "default" else splits
            print(f"attention   {name:14} chunks {label:14} {rate(mix['bytes'], us)}  "
                  f"{mix['bytes'] / us / copy_rate:.3f} of copy")
    print(f"delta rule  state copy (floor)        {rate(state_bytes, delta['copy_us'])}")
    if "fla_us" in delta:
        print(f"delta rule  fla {delta['fla_config']!s:21} {rate(state_bytes, delta['fla_us'])}  "
              f"{delta['fla_us'] / delta['copy_us']:.3f}x floor")
    print(f"delta rule  ours {delta['ours_config']!s:20} {rate(state_bytes, delta['ours_us'])}  "
          f"{delta['ours_us'] / delta['copy_us']:.3f}x floor"
          + (f", {delta['fla_us'] / delta['ours_us']:.3f}x faster than fla" if "fla_us" in delta else ""))
    for config, us in delta["ours_us_by_config"].items():
        print(f"            ours {config:20} {rate(state_bytes, us)}")
    print(f"top-k       argmax (floor)            {rate(logit_bytes, tops['argmax_us'])}")
    print(f"top-k       torch.topk                {rate(logit_bytes, tops['torch_topk_us'])}  "
          f"{tops['torch_topk_us'] / tops['argmax_us']:.2f}x argmax")
    for group, us in tops["top_k_us_by_group"].items():
        print(f"top-k       top_k group {group:<13} {rate(logit_bytes, us)}  {us / tops['argmax_us']:.2f}x argmax, "
              f"{tops['torch_topk_us'] / us:.2f}x faster than torch.topk")
    print(f"top-k       values equal torch.topk's: {tops['top_k_values_equal']}")
    print(f"group max   torch reshape-amax        {rate(logit_bytes, tops['group_max_torch_us'])}  "
          f"{tops['group_max_torch_us'] / tops['argmax_us']:.2f}x argmax")
    print(f"group max   triton                    {rate(logit_bytes, tops['group_max_us'])}  "
          f"{tops['group_max_us'] / tops['argmax_us']:.2f}x argmax, "
          f"{tops['group_max_torch_us'] / tops['group_max_us']:.2f}x faster than torch")
    for block, us in tops["group_max_us_by_block"].items():
        print(f"            triton block {block:<12} {rate(logit_bytes, us)}")
    print(f"group max   equal torch's: {tops['group_max_equal']}")
    print(f"sampler     before: top_k + argmax    {rate(logit_bytes, tops['sampler_before_us'])}")
    print(f"sampler     top_k(with_argmax)        {rate(logit_bytes, tops['sampler_us'])}  "
          f"{tops['sampler_before_us'] / tops['sampler_us']:.2f}x faster than before")
    print(f"sampler     values, ids and greedy equal before's: {tops['sampler_equal']}")
    print(f"candidates  torch.topk {tops['candidates_topk_us']:8.1f} us, sort {tops['candidates_sort_us']:8.1f} us")
    print(f"sample_rows graph: eager {tops['sample_rows_eager_us']:8.1f} us, fused {tops['sample_rows_fused_us']:8.1f} us"
          f"  {tops['sample_rows_eager_us'] / tops['sample_rows_fused_us']:.2f}x; same tokens: "
          f"{tops['sample_rows_equal']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--heads", type=int, default=16, help="key heads of the linear attention")
    parser.add_argument("--v-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=248320)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--groups", default="32,64,128,256,512", help="group sizes of top_k's prefilter to time")
    parser.add_argument("--blocks", default="2048,4096,8192,16384",
                        help="logits per Triton program of the group maxima to time")
    parser.add_argument("--capacity", type=int, default=17408,
                        help="keys per row's block table in the attention timing (PIPO's pairs at max_seq_len 32K)")
    parser.add_argument("--splits", default="1,2,4,8", help="chunks per row to force in the attention timing")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    delta = delta_rule(args.rows, args.heads, args.v_heads, args.head_dim)
    tops = topk(args.rows, args.vocab, args.k, [int(g) for g in args.groups.split(",")],
                [int(b) for b in args.blocks.split(",")])
    mixes = {"600-1900": (600, 1900), "256-16384": (256, 16384), "all 2048": (2048, 2048)}
    attention = paged_attention(args.rows, 4, 4, 256, args.capacity, mixes, [int(n) for n in args.splits.split(",")])
    report(delta, tops, attention)
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "args": vars(args), "delta_rule": delta, "top_k": tops,
              "paged_attention": attention}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
