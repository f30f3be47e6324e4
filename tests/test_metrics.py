"""pass@k against brute force; avg@k, overall, speed metrics and speedups."""
from __future__ import annotations

import itertools
import math

import pytest

from pipo.eval.metrics import accuracy_metrics, pass_at_k, speed_metrics, speedups, summarize, tpot


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of the n samples that contain at least one correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 11))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    value = pass_at_k(2000, 3, 100)
    exact = 1 - math.comb(1997, 100) / math.comb(2000, 100)
    assert value == pytest.approx(exact, rel=1e-9)
    assert pass_at_k(500, 0, 10) == 0.0
    assert pass_at_k(500, 495, 10) == 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_invalid_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, k)


def test_accuracy_metrics():
    correct = [[True, False, False, False], [False] * 4, [True] * 4]
    metrics = accuracy_metrics(correct, k=4)
    assert metrics["num_problems"] == 3 and metrics["num_samples"] == 12
    assert metrics["avg@4"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert metrics["pass@1"] == pytest.approx(metrics["avg@4"])
    assert metrics["pass@4"] == pytest.approx(2 / 3)
    assert set(metrics) >= {"pass@1", "pass@2", "pass@3", "pass@4"}


def _stat(ttft, latency, emitted, pad=0, passes=1, drafted=0, accepted=0):
    return {"prompt_tokens": 10, "emitted_tokens": emitted, "pad_tokens": pad, "forward_passes": passes,
            "ttft_s": ttft, "latency_s": latency, "drafted": drafted, "accepted": accepted}


def test_tpot_excludes_the_first_token():
    assert tpot(_stat(1.0, 11.0, 11)) == pytest.approx(1.0)
    assert tpot(_stat(1.0, 1.5, 1)) == pytest.approx(0.5)  # one token: no division by zero


def test_speed_metrics():
    stats = [_stat(0.1, 1.1, 11, pad=1, passes=6, drafted=5, accepted=4),
             _stat(0.3, 2.3, 21, pad=3, passes=12, drafted=10, accepted=6)]
    speed = speed_metrics(stats)
    assert speed["ttft_s"] == pytest.approx(0.2)
    assert speed["tpot_s"] == pytest.approx(0.1)
    assert speed["tokens_per_forward"] == pytest.approx(32 / 18)
    assert speed["accept_rate"] == pytest.approx(10 / 15)
    assert speed["pad_rate"] == pytest.approx(4 / 36)
    regular = speed_metrics([_stat(0.2, 2.2, 11)])
    assert regular["accept_rate"] is None and regular["pad_rate"] == 0.0 and regular["device"] is None
    assert speed_metrics([{**s, "device": "CPU"} for s in stats])["device"] == "CPU"  # wall-clock times name their device


def test_speedups_over_regular():
    table = {"regular": {"ttft_s": 2.0, "tpot_s": 0.2}, "pipo": {"ttft_s": 1.0, "tpot_s": 0.1},
             "mtp": {"ttft_s": None, "tpot_s": 0.4}}
    result = speedups(table)
    assert result["regular"] == {"ttft_speedup": 1.0, "tpot_speedup": 1.0}
    assert result["pipo"] == {"ttft_speedup": 2.0, "tpot_speedup": 2.0}
    assert result["mtp"] == {"ttft_speedup": None, "tpot_speedup": 0.5}
    with pytest.raises(KeyError, match="regular"):
        speedups({"pipo": table["pipo"]})


def test_summary_overall_is_the_mean_of_benchmark_scores():
    rows = [{"benchmark": "a", "correct": [True, True], "stats": [_stat(0.1, 1.1, 11)] * 2},
            {"benchmark": "a", "correct": [True, True], "stats": []},
            {"benchmark": "a", "correct": [True, True], "stats": []},
            {"benchmark": "b", "correct": [False, True], "stats": []}]
    summary = summarize(rows, k=2)
    assert summary["benchmarks"]["a"]["avg@2"] == 1.0
    assert summary["benchmarks"]["b"]["avg@2"] == 0.5
    assert summary["overall"]["avg@2"] == pytest.approx(0.75)  # not 7/8 (mean over problems)
    assert summary["overall"]["pass@2"] == pytest.approx(1.0)
    assert summary["num_problems"] == 4 and summary["num_samples"] == 8
    assert summary["speed"]["num_completions"] == 2
