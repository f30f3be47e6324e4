"""Rule report: results tables and plots from every metrics.json; speed-ups back onto the evaluation runs."""
from pathlib import Path

from pipo.report import load_metrics, write_report
from pipo.tracking import log_speedups
from pipo.workflow import rule_script

sm = snakemake  # noqa: F821 (injected by Snakemake)
with rule_script(sm, "report", {"method_order": sm.params.method_order}) as run:
    rows = load_metrics(sm.input)
    written = write_report(rows, Path(sm.output.tables[0]).parent, figures_dir=sm.output.figures,
                           method_order=sm.params.method_order)
    log_speedups(run, rows)
    for path in written.values():
        run.log_output(path)
