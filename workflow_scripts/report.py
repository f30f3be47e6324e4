"""Rule report: results tables and plots from every metrics.json; speed-ups back onto the evaluation runs."""
from pathlib import Path

from pipo.report import load_metrics
from pipo.tracking import log_speedups
from pipo.workflow import rule_script, run_cli

sm = snakemake  # noqa: F821 (injected by Snakemake)
with rule_script(sm, "report", {"method_order": sm.params.method_order}) as run:
    order = ["--method-order", *sm.params.method_order] if sm.params.method_order else []
    run_cli(["report", "--metrics", *sm.input, "--out-dir", sm.params.tables, "--figures-dir", sm.params.figures,
             *order])
    log_speedups(run, load_metrics(sm.input))
    for path in [*sm.output, *sorted(Path(sm.params.figures).glob("*.png"))]:
        run.log_output(path)
