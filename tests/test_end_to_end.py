"""The library chain on tiny CPU models: synthetic data -> SFT -> merge -> generate -> score -> report.

It checks that every stage consumes exactly what the previous one writes (checkpoints,
generation records, scores, metrics) through the user-facing `pipo` command.
"""
from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("swift")

from pipo.cli import main  # noqa: E402
from pipo.data import synthetic  # noqa: E402
from pipo.jsonl import write_jsonl  # noqa: E402
from pipo.model.tiny import make_tiny_backbone  # noqa: E402
from pipo.train.stages import run_merge, run_sft  # noqa: E402

pytestmark = pytest.mark.slow


def test_sft_generate_score_report(tmp_path):
    base = make_tiny_backbone(tmp_path / "base", arch="qwen3_5", with_mtp=True,
                              corpus=synthetic.pretraining_corpus(300, seed=0))
    sft_data = write_jsonl(tmp_path / "sft.jsonl", synthetic.sft_rows(24, seed=0))
    adapter = run_sft({
        "model": str(base), "dataset": str(sft_data), "output_dir": str(tmp_path / "sft"),
        "model_type": "pipo_tiny", "lora_rank": 8, "lora_alpha": 16, "warmup_ratio": 0.0, "max_length": 256,
        "gradient_accumulation_steps": 1, "per_device_batch_size": 4, "max_steps": 3, "save_steps": 3,
        "learning_rate": 3e-3,
    })
    merged = run_merge(str(adapter), str(tmp_path / "merged"))

    bench = write_jsonl(tmp_path / "bench.jsonl",
                        synthetic.eval_records(4, seed=1, kind="math") + synthetic.eval_records(3, seed=1, kind="mcq"))
    runs = [(base, "regular", "regular"), (base, "mtp", "mtp"), (base, "eagle", "eagle"), (merged, "pipo", "pipo-sft")]
    metrics = []
    for model, method, label in runs:
        generations = tmp_path / f"{label}.generations.jsonl"
        assert main(["generate", "--model", str(model), "--method", method, "--input", str(bench),
                     "--output", str(generations), "--max-new-tokens", "16", "--n", "2", "--seed", "0",
                     "--conf-threshold", "-1", "--batch-size", "4", "--max-seq-len", "256"]) == 0
        rows = [json.loads(line) for line in generations.read_text().splitlines()]
        assert len(rows) == 7 and all(len(r["completions"]) == 2 for r in rows)
        metrics.append(tmp_path / f"{label}.metrics.json")
        assert main(["score", "--generations", str(generations), "--scores", str(tmp_path / f"{label}.scores.jsonl"),
                     "--metrics", str(metrics[-1]), "--k", "2", "--model-label", "tiny", "--method-label", label,
                     "--no-progress"]) == 0
        summary = json.loads(metrics[-1].read_text())
        assert summary["num_problems"] == 7 and set(summary["benchmarks"]) == {"synthetic_math", "synthetic_mcq"}
        assert 0.0 <= summary["overall"]["avg@2"] <= 1.0

    pipo_speed = json.loads(metrics[-1].read_text())["speed"]
    assert pipo_speed["tokens_per_forward"] > 1.5  # every draft kept: two tokens per forward (EOS aside)

    tables = tmp_path / "tables"
    assert main(["report", "--metrics", *map(str, metrics), "--out-dir", str(tables)]) == 0
    with (tables / "main.csv").open() as handle:
        methods = [row["method"] for row in csv.DictReader(handle)]
    assert methods == ["regular", "eagle", "mtp", "pipo-sft"]
    for name in ("main.md", "main.tex", "speed.csv", "speed.md"):
        assert (tables / name).stat().st_size > 0
    assert list(tables.glob("*.png"))
