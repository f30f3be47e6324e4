"""Results tables and plots: the paper's Table 1 layout, a speed table, accuracy-vs-speed plots.

Input: metric rows, one per (model, method, benchmark), with `avg_at_k` and `pass_at_k`
as fractions in [0, 1], `k`, and the speed fields of SPEED_FIELDS (None where a method
has none); `load_metrics` also turns the scorer's metrics.json summaries into such rows.
`write_report` writes main.{csv,md,tex}, speed.{csv,md}, summary.{csv,md} and PNG plots,
each atomically so a crashed run never leaves half a table behind.

The speed table leads with what does not depend on the hardware (backbone forward passes
per emitted token, and the speedup in forward passes over regular decoding); wall-clock
speedups (TTFT, TPOT) follow, labelled with the device they were measured on (a row's
`device`). The summary table puts accuracy next to the forward-pass figures, one row per method.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from pipo.errors import PIPOError
from pipo.eval.metrics import BASELINE_METHOD, speedups
from pipo.jsonl import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_METHOD_ORDER: tuple[str, ...] = ("regular", "eagle", "mtp", "pipo-sft", "pipo-opd")
METHOD_LABELS: dict[str, str] = {
    "regular": "Regular",
    "eagle": "Eagle-2",
    "mtp": "MTP",
    "pipo-sft": "PIPO-SFT",
    "pipo-opd": "PIPO-SFT+OPD",
}
BENCHMARK_LABELS: dict[str, str] = {
    "aime25": "AIME25",
    "gpqa_diamond": "GPQA-D",
    "livecodebench": "LCB v6",
    "longbench_v2": "LongBench v2",
    "synthetic_math": "Synth-Math",
    "synthetic_mcq": "Synth-MCQ",
}
SPEED_FIELDS: dict[str, str] = {
    "forwards_per_token": "Forwards/token",
    "forward_speedup": "Speedup (forwards)",
    "tokens_per_forward": "Tokens/forward",
    "accept_rate": "Accept rate",
    "pad_rate": "PAD rate",
    "ttft_speedup": "TTFT speedup",
    "tpot_speedup": "TPOT speedup",
}
WALL_CLOCK_FIELDS = ("ttft_speedup", "tpot_speedup")  # labelled with the device they were measured on
SUMMARY_SPEED_FIELDS = ("tokens_per_forward", "accept_rate", "forward_speedup", "tpot_speedup")
OVERALL = "Overall"
DECIMALS = 2
_REQUIRED = ("model", "method", "benchmark", "avg_at_k", "pass_at_k", "k")
_TIMES = ("ttft_s", "tpot_s")  # raw seconds, turned into speedups by fill_speedups


# ------------------------------------------------------------------------ inputs


def method_key(row: Mapping[str, Any]) -> str:
    """The method id of a row; `pipo` with a `variant` (sft/opd) becomes `pipo-<variant>`."""
    method = str(row["method"])
    variant = row.get("variant")
    return f"{method}-{variant}" if method == "pipo" and variant else method


def check_row(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A validated copy of one metric row; errors name the row and the field.

    `pass_at_k` may be null (fewer than k samples): the table shows it as missing.
    """
    if not isinstance(row, Mapping):
        raise PIPOError(f"{where}: expected an object, got {type(row).__name__}")
    for field in _REQUIRED:
        if field not in row or (row[field] is None and field != "pass_at_k"):
            raise PIPOError(f"{where}: missing field {field!r}")
    out = dict(row)
    out["method"] = method_key(row)
    for field in ("avg_at_k", "pass_at_k"):
        value = row[field]
        if value is not None and (not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0):
            raise PIPOError(f"{where}: field {field!r} must be a fraction in [0, 1], got {value!r}")
    for field in (*SPEED_FIELDS, *_TIMES):
        value = row.get(field)
        if value is not None and not isinstance(value, (int, float)):
            raise PIPOError(f"{where}: field {field!r} must be a number or null, got {value!r}")
    if row.get("device") is not None and not isinstance(row["device"], str):
        raise PIPOError(f"{where}: field 'device' must be a string or null, got {row['device']!r}")
    if out.get("forwards_per_token") is None and out.get("tokens_per_forward"):
        out["forwards_per_token"] = 1.0 / out["tokens_per_forward"]
    return out


def rows_from_summary(summary: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """Metric rows from a scorer metrics.json (`pipo.eval.metrics.summarize`): one per benchmark.

    Model and method come from top-level `model`/`method` (and optional `variant`) keys,
    else from its one-element `models`/`methods` lists. Speedups are filled in later,
    across files, by `fill_speedups`.
    """
    identity = {}
    for field in ("model", "method"):
        value = summary.get(field)
        listed = summary.get(f"{field}s") or []
        if value is None and len(listed) != 1:
            raise PIPOError(f"{where}: expected a {field!r} key or exactly one entry in '{field}s', got {listed}")
        identity[field] = value if value is not None else listed[0]
    k = summary.get("k")
    benchmarks = summary.get("benchmarks")
    if not isinstance(k, int) or not isinstance(benchmarks, Mapping):
        raise PIPOError(f"{where}: a scorer summary needs an integer 'k' and a 'benchmarks' object")
    rows = []
    for name, metrics in benchmarks.items():
        speed = metrics.get("speed") or {}
        rows.append(
            {
                **identity,
                "variant": summary.get("variant"),
                "benchmark": name,
                "k": k,
                "avg_at_k": metrics.get(f"avg@{k}"),
                "pass_at_k": metrics.get(f"pass@{k}"),
                **{f: speed.get(f) for f in (*_TIMES, "tokens_per_forward", "accept_rate", "pad_rate", "device")},
            }
        )
    return rows


def fill_speedups(rows: list[dict[str, Any]], baseline: str = BASELINE_METHOD) -> list[dict[str, Any]]:
    """Set missing speedups against `baseline` on the same model and benchmark.

    TTFT/TPOT from raw times; the forward-pass speedup from tokens per forward
    (`baseline forwards per token / method forwards per token`).
    """
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["benchmark"]), {})[row["method"]] = row
    for group in groups.values():
        if baseline not in group:
            continue
        for method, values in speedups(group, baseline).items():
            for field, value in values.items():
                if group[method].get(field) is None:
                    group[method][field] = value
        base = group[baseline].get("tokens_per_forward")
        for row in group.values():
            if row.get("forward_speedup") is None and base and row.get("tokens_per_forward"):
                row["forward_speedup"] = row["tokens_per_forward"] / base
    return rows


def _metric_files(pattern: str | Path) -> list[Path]:
    """A metrics file, every metrics.json under a folder, or the files a glob matches."""
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.rglob("metrics.json"))
    return sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())


def load_metrics(sources: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Gather metric rows from files, folders (metrics.json inside) or glob patterns.

    A file holds a scorer summary (with "benchmarks"), one row object, a list of rows,
    or {"rows": [...]}. Missing speedups are computed across all files at the end.
    """
    rows: list[dict[str, Any]] = []
    files: list[Path] = []
    for source in sources:
        found = _metric_files(source)
        if not found:
            raise FileNotFoundError(f"no metrics files found for {str(source)!r}")
        files.extend(found)
    for path in tqdm(files, desc="reading metrics", unit="file"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PIPOError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
        if isinstance(data, dict) and "benchmarks" in data:
            items = rows_from_summary(data, str(path))
        else:
            items = data.get("rows", [data]) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise PIPOError(f"{path}: expected a summary, a row, a list of rows or {{'rows': [...]}}")
        rows.extend(check_row(item, f"{path}: row {i}") for i, item in enumerate(items))
    return fill_speedups(rows)


def _metric_labels(k: int | None) -> tuple[str, str]:
    """Column names of the two accuracy metrics ("@k" when benchmarks differ in k)."""
    suffix = f"@{k}" if k is not None else "@k"
    return f"avg{suffix}", f"pass{suffix}"


def _ordered(values: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    """Preferred values first (in that order), then the rest in order of appearance."""
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


# -------------------------------------------------------------------------- tables


def build_main_table(
    metrics_rows: Iterable[Mapping[str, Any]],
    *,
    method_order: Sequence[str] = DEFAULT_METHOD_ORDER,
    benchmark_order: Sequence[str] = (),
    scale: float = 100.0,
) -> pd.DataFrame:
    """Table 1: rows (model, method), columns (benchmark, avg@k / pass@k) then Overall.

    Values are percentages rounded to DECIMALS; Overall is the mean over benchmarks
    (missing when a method lacks a benchmark).
    """
    import pandas as pd  # pandas only when a table is built: `pipo --help` stays light

    rows = [check_row(r, f"metrics row {i}") for i, r in enumerate(metrics_rows)]
    if not rows:
        raise PIPOError("no metric rows to report")
    models = _ordered(r["model"] for r in rows)
    methods = _ordered((r["method"] for r in rows), method_order)
    benchmarks = _ordered((r["benchmark"] for r in rows), benchmark_order)
    ks = {b: {int(r["k"]) for r in rows if r["benchmark"] == b} for b in benchmarks}
    for bench, k_values in ks.items():
        if len(k_values) != 1:
            raise PIPOError(f"benchmark {bench!r} has rows with different k: {sorted(k_values)}")
    k_of = {b: k_values.pop() for b, k_values in ks.items()}
    overall_k = k_of[benchmarks[0]] if len(set(k_of.values())) == 1 else None

    cells: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    for r in rows:
        key, bench = (r["model"], r["method"]), r["benchmark"]
        avg, pas = _metric_labels(k_of[bench])
        slot = cells.setdefault(key, {})
        if (bench, avg) in slot:
            raise PIPOError(f"duplicate metrics for model={key[0]!r} method={key[1]!r} benchmark={bench!r}")
        slot[(bench, avg)] = r["avg_at_k"] * scale
        slot[(bench, pas)] = r["pass_at_k"] * scale if r["pass_at_k"] is not None else math.nan
    columns = [(b, label) for b in benchmarks for label in _metric_labels(k_of[b])]
    index = [(m, meth) for m in models for meth in methods if (m, meth) in cells]
    table = pd.DataFrame(
        [[cells[key].get(col, math.nan) for col in columns] for key in index],
        index=pd.MultiIndex.from_tuples(index, names=["model", "method"]),
        columns=pd.MultiIndex.from_tuples(columns, names=["benchmark", "metric"]),
    )
    for position, label in enumerate(_metric_labels(overall_k)):
        per_benchmark = [(b, _metric_labels(k_of[b])[position]) for b in benchmarks]
        table[(OVERALL, label)] = table[per_benchmark].mean(axis=1, skipna=False)
    return table.round(DECIMALS)


def mark_best(table: pd.DataFrame) -> pd.DataFrame:
    """Per column within each model group: "best" for the top value, "second" for the next.

    Ties share the mark; the second mark goes to the best value below the top.
    """
    import pandas as pd

    marks = pd.DataFrame("", index=table.index, columns=table.columns)
    for model in table.index.unique(level="model"):
        group = table.xs(model, level="model", drop_level=False)
        for column in table.columns:
            values = sorted(set(group[column].dropna()), reverse=True)
            for mark, value in zip(("best", "second"), values):
                marks.loc[group.index[group[column] == value], column] = mark
    return marks


def measured_on(metrics_rows: Iterable[Mapping[str, Any]]) -> str | None:
    """The device(s) the rows' wall-clock times were measured on, or None when no row says."""
    devices = sorted({str(r["device"]) for r in metrics_rows if r.get("device")})
    return "; ".join(devices) or None


def speed_header(field: str, device: str | None) -> str:
    """Column title of a speed field; a wall-clock one names its device."""
    label = SPEED_FIELDS[field]
    return f"{label} on {device}" if device and field in WALL_CLOCK_FIELDS else label


def build_speed_table(
    metrics_rows: Iterable[Mapping[str, Any]], *, method_order: Sequence[str] = DEFAULT_METHOD_ORDER
) -> pd.DataFrame:
    """Speed per (model, method): each speed field averaged over the benchmarks that report it."""
    import pandas as pd

    rows = [check_row(r, f"metrics row {i}") for i, r in enumerate(metrics_rows)]
    frame = pd.DataFrame(
        [{"model": r["model"], "method": r["method"], **{f: r.get(f) for f in SPEED_FIELDS}} for r in rows]
    )
    frame[list(SPEED_FIELDS)] = frame[list(SPEED_FIELDS)].astype(float)
    table = frame.groupby(["model", "method"], sort=False)[list(SPEED_FIELDS)].mean()
    models = _ordered(r["model"] for r in rows)
    methods = _ordered((r["method"] for r in rows), method_order)
    order = [(m, meth) for m in models for meth in methods if (m, meth) in table.index]
    return table.loc[order].round(DECIMALS)


# ----------------------------------------------------------------------- rendering


def _fmt(value: float, missing: str = "-") -> str:
    return missing if _missing(value) else f"{value:.{DECIMALS}f}"


def _missing(value: float | None) -> bool:
    """A table cell without a number (None or NaN), as pandas leaves it."""
    return value is None or math.isnan(value)


def _label(name: str, labels: Mapping[str, str]) -> str:
    return labels.get(name, name)


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if re.search(r'[",\n]', text) else text


def _csv(table: pd.DataFrame, columns: Sequence[str]) -> str:
    """Plain numbers (missing: empty), one header row: model, method, then `columns`."""
    lines = [",".join(["model", "method", *map(_csv_cell, columns)])]
    for (model, method), values in table.iterrows():
        lines.append(",".join([_csv_cell(model), _csv_cell(method), *(_fmt(v, "") for v in values)]))
    return "\n".join(lines) + "\n"


def _cells(values: pd.Series, marks: pd.Series | None, wrap: Mapping[str, str]) -> list[str]:
    """Formatted numbers, each wrapped by its mark ("best"/"second"/""); missing: "-"."""
    kinds = marks if marks is not None else [""] * len(values)
    return ["-" if _missing(v) else wrap[kind].format(_fmt(v)) for v, kind in zip(values, kinds)]


def _markdown(table: pd.DataFrame, header: Sequence[str], marks: pd.DataFrame | None = None) -> str:
    """A markdown table; the model is named on the first row of its group only."""
    wrap = {"best": "**{}**", "second": "<u>{}</u>", "": "{}"}
    lines = ["| " + " | ".join(["Model", "Method", *header]) + " |", "|" + "---|" * 2 + "---:|" * len(header)]
    previous = None
    for (model, method), values in table.iterrows():
        cells = _cells(values, marks.loc[(model, method)] if marks is not None else None, wrap)
        shown = model if model != previous else ""
        lines.append("| " + " | ".join([shown, _label(method, METHOD_LABELS), *cells]) + " |")
        previous = model
    return "\n".join(lines) + "\n"


def main_csv(table: pd.DataFrame) -> str:
    """Table 1 as CSV; columns are '<benchmark> <metric>'."""
    return _csv(table, [f"{b} {m}" for b, m in table.columns])


def main_markdown(table: pd.DataFrame, marks: pd.DataFrame | None = None) -> str:
    """Table 1 in markdown: best in **bold**, second-best <u>underlined</u>."""
    header = [f"{_label(b, BENCHMARK_LABELS)} {m}" for b, m in table.columns]
    return _markdown(table, header, mark_best(table) if marks is None else marks)


_TEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
}


def tex_escape(text: str) -> str:
    """Escape LaTeX special characters in a label."""
    return "".join(_TEX_SPECIAL.get(c, c) for c in text)


def main_latex(table: pd.DataFrame, marks: pd.DataFrame | None = None) -> str:
    """Table 1 as a booktabs tabular: benchmark headers over their metric columns, a rule per model."""
    marks = mark_best(table) if marks is None else marks
    wrap = {"best": "\\textbf{{{}}}", "second": "\\underline{{{}}}", "": "{}"}
    benchmarks = list(dict.fromkeys(b for b, _ in table.columns))
    spans = [(b, [m for bb, m in table.columns if bb == b]) for b in benchmarks]
    top, rules, col = ["", ""], [], 3
    for bench, metrics in spans:
        top.append(f"\\multicolumn{{{len(metrics)}}}{{c}}{{{tex_escape(_label(bench, BENCHMARK_LABELS))}}}")
        rules.append(f"\\cmidrule(lr){{{col}-{col + len(metrics) - 1}}}")
        col += len(metrics)
    lines = [
        f"\\begin{{tabular}}{{ll{'r' * len(table.columns)}}}",
        "\\toprule",
        " & ".join(top) + " \\\\",
        " ".join(rules),
        " & ".join(["Model", "Method", *(tex_escape(m) for _, m in table.columns)]) + " \\\\",
    ]
    previous = None
    for (model, method), values in table.iterrows():
        if model != previous:
            lines.append("\\midrule")
        shown = tex_escape(model) if model != previous else ""
        cells = _cells(values, marks.loc[(model, method)], wrap)
        lines.append(" & ".join([shown, tex_escape(_label(method, METHOD_LABELS)), *cells]) + " \\\\")
        previous = model
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def build_summary_table(main: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method): avg@k per benchmark and overall, then tokens per forward, acceptance and speedups."""
    accuracy = main[[c for c in main.columns if c[1].startswith("avg")]]
    accuracy.columns = [f"{_label(b, BENCHMARK_LABELS)} {m}" for b, m in accuracy.columns]
    return accuracy.join(speed[list(SUMMARY_SPEED_FIELDS)])


def _headers(columns: Iterable[str], device: str | None) -> list[str]:
    return [speed_header(c, device) if c in SPEED_FIELDS else c for c in columns]


def speed_csv(table: pd.DataFrame, device: str | None = None) -> str:
    """The speed table (or summary table) as CSV: field names as columns, wall-clock ones `<field> on <device>`."""
    return _csv(table, [f"{c} on {device}" if device and c in WALL_CLOCK_FIELDS else c for c in table.columns])


def speed_markdown(table: pd.DataFrame, device: str | None = None) -> str:
    """The speed table (or summary table) in markdown, no marks (higher is not always better, e.g. PAD rate)."""
    return _markdown(table, _headers(table.columns, device))


# --------------------------------------------------------------------------- plots


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def accuracy_speed_png(model: str, main: pd.DataFrame, speed: pd.DataFrame) -> bytes:
    """PNG: overall avg@k against the forward-pass and the TPOT speedup, one labelled point per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg only: no display, no global state
    from matplotlib.figure import Figure

    accuracy = main.xs(model, level="model").loc[:, OVERALL].iloc[:, 0]
    fig = Figure(figsize=(9, 4), dpi=100)
    FigureCanvasAgg(fig)
    for position, field in enumerate(("forward_speedup", "tpot_speedup")):
        ax = fig.add_subplot(1, 2, position + 1)
        for method, acc in accuracy.items():
            x = speed.loc[(model, method), field]
            if _missing(x) or _missing(acc):
                continue
            ax.scatter([x], [acc], s=40)
            label = _label(method, METHOD_LABELS)
            ax.annotate(label, (x, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"{SPEED_FIELDS[field]} (x)")
        ax.set_ylabel(f"{OVERALL} {accuracy.name}")
        ax.margins(x=0.2, y=0.1)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{model}: accuracy vs speed")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# --------------------------------------------------------------------------- write


def write_report(
    metrics_rows: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    figures_dir: str | Path | None = None,
    method_order: Sequence[str] = DEFAULT_METHOD_ORDER,
    benchmark_order: Sequence[str] = (),
) -> dict[str, Path]:
    """Write every table and plot; return {file name: path}. Plots go to figures_dir (default out_dir)."""
    rows = fill_speedups([check_row(r, f"metrics row {i}") for i, r in enumerate(metrics_rows)])
    main = build_main_table(rows, method_order=method_order, benchmark_order=benchmark_order)
    speed = build_speed_table(rows, method_order=method_order)
    summary = build_summary_table(main, speed)
    device = measured_on(rows)
    marks = mark_best(main)
    out, figures = Path(out_dir), Path(figures_dir) if figures_dir is not None else Path(out_dir)
    texts = {
        "main.csv": main_csv(main),
        "main.md": main_markdown(main, marks),
        "main.tex": main_latex(main, marks),
        "speed.csv": speed_csv(speed, device),
        "speed.md": speed_markdown(speed, device),
        "summary.csv": speed_csv(summary, device),
        "summary.md": speed_markdown(summary, device),
    }
    written = {name: atomic_write_text(out / name, text) for name, text in texts.items()}
    for model in tqdm(main.index.unique(level="model"), desc="plots", unit="model"):
        name = f"accuracy_vs_speed_{_slug(model)}.png"
        written[name] = atomic_write_bytes(figures / name, accuracy_speed_png(model, main, speed))
    return written


# --------------------------------------------------------------------------- `pipo report`


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pipo report` to the `pipo` parser."""
    parser = subparsers.add_parser(
        "report", help="build the results tables (csv/md/tex) and plots from metrics files",
        description="Gather metrics (files, folders holding metrics.json, or glob patterns) and "
                    "write main.{csv,md,tex}, speed.{csv,md} and accuracy-vs-speed plots.",
    )
    parser.add_argument("--metrics", nargs="+", required=True, help="metrics JSON files, folders or globs")
    parser.add_argument("--out-dir", required=True, help="folder for the tables")
    parser.add_argument("--figures-dir", default=None, help="folder for the plots (default: --out-dir)")
    parser.add_argument("--method-order", nargs="+", default=None,
                        help="row order of methods within a model (default: regular eagle mtp pipo-sft pipo-opd)")
    parser.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    written = write_report(load_metrics(args.metrics), args.out_dir, figures_dir=args.figures_dir,
                           method_order=args.method_order or DEFAULT_METHOD_ORDER)
    print("\n".join(str(path) for path in written.values()))
    return 0
