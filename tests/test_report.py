"""The results report reproduces a known Table 1 exactly and writes valid plots."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from pipo.report import build_main_table, load_metrics, mark_best, write_report

# (model, method, benchmark): (avg, pass, ttft, tpot, tokens/forward, accept, pad)
_METRICS = {
    ("tiny-9B", "pipo-opd", "aime25"): (0.55, 0.90, 2.64, 2.07, 1.97, 0.90, 0.03),
    ("tiny_4B", "pipo-opd", "aime25"): (0.50, 0.80, 2.6, 2.0, 1.95, 0.84, 0.04),
    ("tiny_4B", "pipo-opd", "gpqa_diamond"): (0.41, 0.75, 2.6, 2.1, 1.95, 0.90, 0.10),
    ("tiny_4B", "regular", "aime25"): (0.50, 0.60, 1.0, 1.0, 1.0, None, None),
    ("tiny_4B", "regular", "gpqa_diamond"): (0.40, 0.70, 1.0, 1.0, 1.0, None, None),
    ("tiny_4B", "mtp", "aime25"): (0.30, 0.50, 1.0, 1.9, 2.0, None, None),
    ("tiny_4B", "mtp", "gpqa_diamond"): (0.30, 0.55, 1.0, 1.9, 2.0, None, None),
    ("tiny_4B", "eagle", "aime25"): (0.45, 0.60, 0.9, 1.4, 2.0, 0.6, None),
    ("tiny_4B", "eagle", "gpqa_diamond"): (0.35, 0.65, 0.9, 1.6, 2.2, 0.7, None),
    ("tiny_4B", "pipo-sft", "aime25"): (0.45, 0.70, 2.5, 1.8, 1.9, 0.8, 0.1),
    ("tiny_4B", "pipo-sft", "gpqa_diamond"): (0.42, 0.75, 2.7, 2.0, 1.9, 0.8, 0.2),
    ("tiny-9B", "regular", "aime25"): (0.60, 0.70, 1.0, 1.0, 1.0, None, None),
    ("tiny-9B", "regular", "gpqa_diamond"): (0.50, 0.80, 1.0, 1.0, 1.0, None, None),
}
_FIELDS = ("avg_at_k", "pass_at_k", "ttft_speedup", "tpot_speedup", "tokens_per_forward", "accept_rate", "pad_rate")


def metric_rows() -> list[dict]:
    rows = [
        {"model": model, "method": method, "benchmark": bench, "k": 4, **dict(zip(_FIELDS, values))}
        for (model, method, bench), values in _METRICS.items()
    ]
    rows[-3] = {**rows[-3], "method": "pipo", "variant": "sft"}  # the scorer may split method and variant
    return rows


EXPECTED_CSV = """\
model,method,aime25 avg@4,aime25 pass@4,gpqa_diamond avg@4,gpqa_diamond pass@4,Overall avg@4,Overall pass@4
tiny-9B,regular,60.00,70.00,50.00,80.00,55.00,75.00
tiny-9B,pipo-opd,55.00,90.00,,,,
tiny_4B,regular,50.00,60.00,40.00,70.00,45.00,65.00
tiny_4B,eagle,45.00,60.00,35.00,65.00,40.00,62.50
tiny_4B,mtp,30.00,50.00,30.00,55.00,30.00,52.50
tiny_4B,pipo-sft,45.00,70.00,42.00,75.00,43.50,72.50
tiny_4B,pipo-opd,50.00,80.00,41.00,75.00,45.50,77.50
"""

EXPECTED_MD = """\
| Model | Method | AIME25 avg@4 | AIME25 pass@4 | GPQA-D avg@4 | GPQA-D pass@4 | Overall avg@4 | Overall pass@4 |
|---|---|---:|---:|---:|---:|---:|---:|
| tiny-9B | Regular | **60.00** | <u>70.00</u> | **50.00** | **80.00** | **55.00** | **75.00** |
|  | PIPO-SFT+OPD | <u>55.00</u> | **90.00** | - | - | - | - |
| tiny_4B | Regular | **50.00** | 60.00 | 40.00 | <u>70.00</u> | <u>45.00</u> | 65.00 |
|  | Eagle-2 | <u>45.00</u> | 60.00 | 35.00 | 65.00 | 40.00 | 62.50 |
|  | MTP | 30.00 | 50.00 | 30.00 | 55.00 | 30.00 | 52.50 |
|  | PIPO-SFT | <u>45.00</u> | <u>70.00</u> | **42.00** | **75.00** | 43.50 | <u>72.50</u> |
|  | PIPO-SFT+OPD | **50.00** | **80.00** | <u>41.00</u> | **75.00** | **45.50** | **77.50** |
"""

EXPECTED_TEX = r"""\begin{tabular}{llrrrrrr}
\toprule
 &  & \multicolumn{2}{c}{AIME25} & \multicolumn{2}{c}{GPQA-D} & \multicolumn{2}{c}{Overall} \\
\cmidrule(lr){3-4} \cmidrule(lr){5-6} \cmidrule(lr){7-8}
Model & Method & avg@4 & pass@4 & avg@4 & pass@4 & avg@4 & pass@4 \\
\midrule
tiny-9B & Regular & \textbf{60.00} & \underline{70.00} & \textbf{50.00} & \textbf{80.00} & \textbf{55.00} & \textbf{75.00} \\
 & PIPO-SFT+OPD & \underline{55.00} & \textbf{90.00} & - & - & - & - \\
\midrule
tiny\_4B & Regular & \textbf{50.00} & 60.00 & 40.00 & \underline{70.00} & \underline{45.00} & 65.00 \\
 & Eagle-2 & \underline{45.00} & 60.00 & 35.00 & 65.00 & 40.00 & 62.50 \\
 & MTP & 30.00 & 50.00 & 30.00 & 55.00 & 30.00 & 52.50 \\
 & PIPO-SFT & \underline{45.00} & \underline{70.00} & \textbf{42.00} & \textbf{75.00} & 43.50 & \underline{72.50} \\
 & PIPO-SFT+OPD & \textbf{50.00} & \textbf{80.00} & \underline{41.00} & \textbf{75.00} & \textbf{45.50} & \textbf{77.50} \\
\bottomrule
\end{tabular}
"""

# Forwards/token = 1 / tokens per forward; speedup in forwards = tokens per forward / regular's
# (eagle: (2.0 / 1.0 + 2.2 / 1.0) / 2 = 2.10); each averaged over the benchmarks.
EXPECTED_SPEED_CSV = """\
model,method,forwards_per_token,forward_speedup,tokens_per_forward,accept_rate,pad_rate,ttft_speedup on H100,tpot_speedup on H100
tiny-9B,regular,1.00,1.00,1.00,,,1.00,1.00
tiny-9B,pipo-opd,0.51,1.97,1.97,0.90,0.03,2.64,2.07
tiny_4B,regular,1.00,1.00,1.00,,,1.00,1.00
tiny_4B,eagle,0.48,2.10,2.10,0.65,,0.90,1.50
tiny_4B,mtp,0.50,2.00,2.00,,,1.00,1.90
tiny_4B,pipo-sft,0.53,1.90,1.90,0.80,0.15,2.60,1.90
tiny_4B,pipo-opd,0.51,1.95,1.95,0.87,0.07,2.60,2.05
"""

EXPECTED_SPEED_MD = """\
| Model | Method | Forwards/token | Speedup (forwards) | Tokens/forward | Accept rate | PAD rate | TTFT speedup on H100 | TPOT speedup on H100 |
|---|---|---:|---:|---:|---:|---:|---:|---:|
| tiny-9B | Regular | 1.00 | 1.00 | 1.00 | - | - | 1.00 | 1.00 |
|  | PIPO-SFT+OPD | 0.51 | 1.97 | 1.97 | 0.90 | 0.03 | 2.64 | 2.07 |
| tiny_4B | Regular | 1.00 | 1.00 | 1.00 | - | - | 1.00 | 1.00 |
|  | Eagle-2 | 0.48 | 2.10 | 2.10 | 0.65 | - | 0.90 | 1.50 |
|  | MTP | 0.50 | 2.00 | 2.00 | - | - | 1.00 | 1.90 |
|  | PIPO-SFT | 0.53 | 1.90 | 1.90 | 0.80 | 0.15 | 2.60 | 1.90 |
|  | PIPO-SFT+OPD | 0.51 | 1.95 | 1.95 | 0.87 | 0.07 | 2.60 | 2.05 |
"""

EXPECTED_SUMMARY_MD = """\
| Model | Method | AIME25 avg@4 | GPQA-D avg@4 | Overall avg@4 | Tokens/forward | Accept rate | Speedup (forwards) | TPOT speedup on H100 |
|---|---|---:|---:|---:|---:|---:|---:|---:|
| tiny-9B | Regular | 60.00 | 50.00 | 55.00 | 1.00 | - | 1.00 | 1.00 |
|  | PIPO-SFT+OPD | 55.00 | - | - | 1.97 | 0.90 | 1.97 | 2.07 |
| tiny_4B | Regular | 50.00 | 40.00 | 45.00 | 1.00 | - | 1.00 | 1.00 |
|  | Eagle-2 | 45.00 | 35.00 | 40.00 | 2.10 | 0.65 | 2.10 | 1.50 |
|  | MTP | 30.00 | 30.00 | 30.00 | 2.00 | - | 2.00 | 1.90 |
|  | PIPO-SFT | 45.00 | 42.00 | 43.50 | 1.90 | 0.80 | 1.90 | 1.90 |
|  | PIPO-SFT+OPD | 50.00 | 41.00 | 45.50 | 1.95 | 0.87 | 1.95 | 2.05 |
"""


def test_report_reproduces_known_tables(tmp_path: Path) -> None:
    rows = [{**row, "device": "H100"} for row in metric_rows()]  # where the wall-clock times were measured
    written = write_report(rows, tmp_path / "tables", figures_dir=tmp_path / "figures")
    assert written["main.csv"].read_text() == EXPECTED_CSV
    assert written["main.md"].read_text() == EXPECTED_MD
    assert written["main.tex"].read_text() == EXPECTED_TEX
    assert written["speed.csv"].read_text() == EXPECTED_SPEED_CSV
    assert written["speed.md"].read_text() == EXPECTED_SPEED_MD
    assert written["summary.md"].read_text() == EXPECTED_SUMMARY_MD
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [
        "main.csv", "main.md", "main.tex", "speed.csv", "speed.md", "summary.csv", "summary.md"
    ]  # no temp files left behind


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    written = write_report(metric_rows(), tmp_path)
    plots = {name: path for name, path in written.items() if name.endswith(".png")}
    assert sorted(plots) == ["accuracy_vs_speed_tiny-9B.png", "accuracy_vs_speed_tiny_4B.png"]
    for path in plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100


def test_method_order_is_configurable() -> None:
    table = build_main_table(metric_rows(), method_order=("pipo-opd", "regular"))
    assert list(table.loc["tiny_4B"].index) == ["pipo-opd", "regular", "mtp", "eagle", "pipo-sft"]  # the rest: as they appear


def test_ties_share_marks() -> None:
    rows = [
        {"model": "m", "method": meth, "benchmark": "b", "k": 1, "avg_at_k": a, "pass_at_k": 0.5}
        for meth, a in (("regular", 0.5), ("eagle", 0.5), ("mtp", 0.25), ("pipo-sft", 0.25), ("pipo-opd", 0.1))
    ]
    marks = mark_best(build_main_table(rows))
    assert list(marks[("b", "avg@1")]) == ["best", "best", "second", "second", ""]
    assert list(marks[("b", "pass@1")]) == ["best"] * 5


def test_load_metrics_from_files_dirs_and_globs(tmp_path: Path) -> None:
    rows = metric_rows()
    for i, row in enumerate(rows[:5]):
        (tmp_path / "runs" / f"r{i}").mkdir(parents=True)
        (tmp_path / "runs" / f"r{i}" / "metrics.json").write_text(json.dumps(row))
    (tmp_path / "more.json").write_text(json.dumps({"rows": rows[5:9]}))
    (tmp_path / "list.json").write_text(json.dumps(rows[9:]))
    loaded = load_metrics([tmp_path / "runs", str(tmp_path / "more.json"), str(tmp_path / "l*.json")])
    assert len(loaded) == len(rows)
    assert build_main_table(loaded).equals(build_main_table(rows))


def test_bad_metrics_name_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"model": "m", "method": "regular", "benchmark": "b", "k": 4, "avg_at_k": 0.5}))
    with pytest.raises(ValueError, match=r"metrics\.json: row 0: missing field 'pass_at_k'"):
        load_metrics([bad])
    bad.write_text(json.dumps({"model": "m", "method": "regular", "benchmark": "b", "k": 4, "avg_at_k": 52.1, "pass_at_k": 0.6}))
    with pytest.raises(ValueError, match="'avg_at_k' must be a fraction"):
        load_metrics([bad])
    with pytest.raises(FileNotFoundError, match="no metrics files"):
        load_metrics([tmp_path / "missing" / "*.json"])
    duplicate = metric_rows()[:1] * 2
    with pytest.raises(ValueError, match="duplicate metrics for model='tiny-9B'"):
        build_main_table(duplicate)


def _scored(method: str, ttft: float, latency: float, correct: list[bool]) -> dict:
    stat = {"ttft_s": ttft, "latency_s": latency, "emitted_tokens": 11, "forward_passes": 10,
            "drafted": 8, "accepted": 6, "pad_tokens": 2}
    return {"benchmark": "aime25", "method": method, "model": "m", "correct": correct, "stats": [stat] * len(correct)}


def test_scorer_summaries_and_cli(tmp_path: Path) -> None:
    from pipo.cli import main
    from pipo.eval.metrics import summarize

    regular = summarize([_scored("regular", 1.0, 11.0, [True, False, True, True])], k=4)
    pipo = {**summarize([_scored("pipo", 0.5, 5.5, [True, True, False, False])], k=4), "variant": "opd"}
    for name, summary in (("regular", regular), ("pipo", pipo)):
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "metrics.json").write_text(json.dumps(summary))

    rows = {r["method"]: r for r in load_metrics([tmp_path / "eval"])}
    assert sorted(rows) == ["pipo-opd", "regular"]
    assert (rows["pipo-opd"]["ttft_speedup"], rows["pipo-opd"]["tpot_speedup"]) == (2.0, 2.0)
    assert (rows["regular"]["avg_at_k"], rows["pipo-opd"]["avg_at_k"]) == (0.75, 0.5)

    assert main(["report", "--metrics", str(tmp_path / "eval" / "*" / "metrics.json"), "--out-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "main.md").read_text().splitlines()[2:] == [
        "| m | Regular | **75.00** | **100.00** | **75.00** | **100.00** |",
        "|  | PIPO-SFT+OPD | <u>50.00</u> | **100.00** | <u>50.00</u> | **100.00** |",
    ]
    assert "| m | Regular | 0.91 | 1.00 | 1.10 | 0.75 | 0.15 | 1.00 | 1.00 |" in (tmp_path / "out" / "speed.md").read_text()
