"""TPOT of the demo's student: regular (base checkpoint) against PIPO (SFT checkpoint), on CPU.

Both run in this one process with a fixed thread count, alternating, repeated, through
`pipo generate` with the demo's evaluation settings (the `generate` rule's code path), on a
demo results tree (`snakemake --configfile presets/demo.yaml --cores 2 all` first):

    python benchmarks/demo_tpot.py --results results --reps 3

`--clock cpu` stamps the engine's per-request times with this process's CPU time instead of
the wall clock: on a machine shared with other jobs the wall clock counts time spent waiting
for a core, the CPU clock does not, so a single-threaded run then measures what an idle
machine would (the engine never waits on anything but the CPU here). Also printed: where
the CPU time goes, split into decode steps and admissions (prefill + first tokens).
`--count-ops` adds one more pass per method that counts the ATen operations dispatched per
emitted token: on this dispatch-bound model a figure of the CPU cost that no neighbour moves.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

METHODS = (("regular", "models/tiny-student"), ("pipo", "checkpoints/tiny-student/pipo-sft"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("results"), help="a finished demo results tree")
    p.add_argument("--benchmark", default="synthetic_math")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="decode slots (the demo's eval.batch_size)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--count-ops", action="store_true", help="also count ATen ops per emitted token (one more pass)")
    return p.parse_args()


class OpCounter(TorchDispatchMode):
    """Counts every ATen operation dispatched while active (views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))

    def within(self, fn):
        """`fn` with this counter active during each call."""
        def run(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        return run


def timed(counter: collections.Counter, cls: type, name: str) -> None:
    """Add the CPU time of every call of `cls.name` to `counter[name]`."""
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            counter[name] += time.process_time() - start

    setattr(cls, name, wrapper)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import pipo.engine.sequence as sequence
    from pipo.cli import main as pipo_main
    from pipo.engine.engine import Engine
    from pipo.eval.metrics import speed_metrics

    if args.clock == "cpu":
        sequence.time = types.SimpleNamespace(perf_counter=time.process_time)
    split = collections.Counter()
    timed(split, Engine, "step")
    timed(split, Engine, "_prefill")
    records = args.results / "data/bench" / f"{args.benchmark}.jsonl"
    tpot: dict[str, list[float]] = collections.defaultdict(list)

    def generate(method: str, model: str, out: Path) -> list[dict]:
        code = pipo_main([
            "generate", "--model", str(args.results / model), "--method", method, "--input", str(records),
            "--output", str(out), "--n", "2", "--temperature", "0.6", "--top-p", "0.95", "--top-k", "20",
            "--max-new-tokens", "96", "--max-seq-len", "256", "--conf-threshold", "0.5",
            "--batch-size", str(args.batch_size), "--seed", "0",
        ])
        if code:
            raise SystemExit(code)
        return [s for line in out.read_text().splitlines() for s in json.loads(line)["stats"]]

    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for method, model in METHODS:
                split.clear()
                cpu = time.process_time()
                stats = generate(method, model, Path(tmp) / f"{method}-{rep}.jsonl")
                cpu = time.process_time() - cpu
                speed = speed_metrics(stats)
                tpot[method].append(speed["tpot_s"])
                print(f"rep {rep} {method:8s} TPOT {1e3 * speed['tpot_s']:6.2f} ms  TTFT {1e3 * speed['ttft_s']:6.2f} ms  "
                      f"tokens/forward {speed['tokens_per_forward']:.2f}  CPU {cpu:5.2f} s: decode steps "
                      f"{split['step'] - split['_prefill']:5.2f} s, admissions {split['_prefill']:5.2f} s", flush=True)
        ops, step = {}, Engine.step
        for method, model in METHODS if args.count_ops else ():
            counter = OpCounter()
            Engine.step = counter.within(step)  # engine steps only: model loading is not counted
            stats = generate(method, model, Path(tmp) / f"{method}-ops.jsonl")
            ops[method] = counter.ops / sum(s["emitted_tokens"] for s in stats)
        Engine.step = step
    ratios = [r / p for r, p in zip(tpot["regular"], tpot["pipo"])]
    print(f"TPOT speed-up of pipo over regular ({args.clock} clock, {args.threads} thread(s), batch {args.batch_size}): "
          f"median {statistics.median(ratios):.2f}x, per rep {', '.join(f'{r:.2f}' for r in ratios)}")
    if ops:
        print(f"ATen ops per emitted token (engine steps): regular {ops['regular']:.1f}, "
              f"pipo {ops['pipo']:.1f}, ratio {ops['regular'] / ops['pipo']:.2f}x")


if __name__ == "__main__":
    main()
