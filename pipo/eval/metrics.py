"""Accuracy metrics (avg@k, unbiased pass@k) and speed metrics (TTFT, TPOT, ...).

Accuracies are fractions in [0, 1]; the report turns them into percentages.
The overall score is the mean of the benchmark scores (each benchmark weighs the same,
as in the paper), not the mean over problems.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

BASELINE_METHOD = "regular"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def accuracy_metrics(correct: Sequence[Sequence[bool]], k: int) -> dict[str, Any]:
    """avg@k and pass@j (j = 1..n, n = fewest samples of any problem) for one benchmark.

    ``correct[p][s]`` says whether sample ``s`` of problem ``p`` is right. avg@k is the
    mean accuracy over all samples (an unbiased estimate for any k <= n).
    """
    n_min = min((len(flags) for flags in correct), default=0)
    metrics: dict[str, Any] = {
        "num_problems": len(correct),
        "num_samples": sum(len(flags) for flags in correct),
        f"avg@{k}": mean(mean(map(float, flags)) for flags in correct if flags),
    }
    for j in range(1, n_min + 1):
        metrics[f"pass@{j}"] = mean(pass_at_k(len(flags), sum(flags), j) for flags in correct)
    return metrics


def tpot(stat: Mapping[str, Any]) -> float:
    """Time per output token after the first: ``(latency - ttft) / max(emitted - 1, 1)``."""
    return (stat["latency_s"] - stat["ttft_s"]) / max(stat["emitted_tokens"] - 1, 1)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def speed_metrics(stats: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Speed over completions: per-completion means for TTFT/TPOT, ratios of sums for
    rates (so long completions weigh by their tokens)."""
    stats = list(stats)
    total = defaultdict(float)
    for stat in stats:
        for key in ("emitted_tokens", "pad_tokens", "forward_passes", "drafted", "accepted"):
            total[key] += stat.get(key, 0) or 0
    return {
        "num_completions": len(stats),
        "ttft_s": mean(s["ttft_s"] for s in stats),
        "tpot_s": mean(tpot(s) for s in stats),
        "latency_s": mean(s["latency_s"] for s in stats),
        "emitted_tokens": mean(s["emitted_tokens"] for s in stats),
        "tokens_per_forward": _ratio(total["emitted_tokens"], total["forward_passes"]),
        "accept_rate": _ratio(total["accepted"], total["drafted"]),
        "pad_rate": _ratio(total["pad_tokens"], total["emitted_tokens"] + total["pad_tokens"]),
        "device": ", ".join(sorted({str(s["device"]) for s in stats if s.get("device")})) or None,
    }


def summarize(rows: Iterable[Mapping[str, Any]], k: int) -> dict[str, Any]:
    """metrics.json content from scored rows (``benchmark``, ``correct``, ``stats``)."""
    by_benchmark: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_benchmark[row["benchmark"]].append(row)
    benchmarks = {
        name: {**accuracy_metrics([r["correct"] for r in group], k),
               "speed": speed_metrics(s for r in group for s in r.get("stats") or [])}
        for name, group in sorted(by_benchmark.items())
    }
    all_rows = [r for group in by_benchmark.values() for r in group]
    return {
        "k": k,
        "num_problems": len(all_rows),
        "num_samples": sum(len(r["correct"]) for r in all_rows),
        "methods": sorted({str(r.get("method")) for r in all_rows if r.get("method")}),
        "models": sorted({str(r.get("model")) for r in all_rows if r.get("model")}),
        "overall": overall(benchmarks),
        "benchmarks": benchmarks,
        "speed": speed_metrics(s for r in all_rows for s in r.get("stats") or []),
    }


def overall(benchmarks: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Mean over benchmarks of every accuracy metric (avg@k, pass@j) they all report."""
    names = [key for key in _accuracy_keys(benchmarks)
             if all(b.get(key) is not None for b in benchmarks.values())]
    return {key: sum(b[key] for b in benchmarks.values()) / len(benchmarks) for key in names}


def _accuracy_keys(benchmarks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for metrics in benchmarks.values():
        keys.update(dict.fromkeys(k for k in metrics if k.startswith(("avg@", "pass@"))))
    return list(keys)


def speedups(table: Mapping[str, Mapping[str, Any]], baseline: str = BASELINE_METHOD) -> dict[str, dict[str, float | None]]:
    """TTFT and TPOT speedups of every method over ``baseline`` (baseline / method).

    ``table`` maps a method to its speed metrics (``ttft_s``, ``tpot_s``).
    """
    if baseline not in table:
        raise KeyError(f"speedups need the {baseline!r} method; got {sorted(table)}")
    base = table[baseline]
    return {
        method: {f"{key.removesuffix('_s')}_speedup": _speedup(base.get(key), metrics.get(key))
                 for key in ("ttft_s", "tpot_s")}
        for method, metrics in table.items()
    }


def _speedup(baseline_time: float | None, method_time: float | None) -> float | None:
    if baseline_time is None or not method_time:
        return None
    return baseline_time / method_time
