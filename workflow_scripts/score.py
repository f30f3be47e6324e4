"""Rules grade / score: grade generations with `pipo score`; log the metrics to MLflow."""
import json

from pipo.tracking import eval_figures
from pipo.workflow import concat_files, rule_script, run_cli

sm = snakemake  # noqa: F821 (injected by Snakemake)
labels = {key: value for key, value in {"model": sm.params.model_label, "method": sm.params.method_label,
                                        "benchmark": sm.wildcards.get("benchmark")}.items() if value is not None}
params = {"k": sm.params.k, "workers": sm.params.workers, **labels}  # params: the compare view lists them per run
with rule_script(sm, "grade" if sm.rule == "grade" else "eval", params, **labels) as run:
    shards = [sm.input.generations] if isinstance(sm.input.generations, str) else list(sm.input.generations)
    generations = sm.output.get("generations") or shards[0]
    if sm.output.get("generations"):  # score: the shards of one (variant, method, benchmark) as one file
        concat_files(shards, generations)
    run_cli(["score", "--generations", generations, "--scores", sm.output.scores, "--metrics", sm.output.metrics,
             "--k", str(sm.params.k), "--workers", str(sm.params.workers), "--no-progress",
             "--model-label", sm.params.model_label, "--method-label", sm.params.method_label])
    metrics = json.loads(open(sm.output.metrics).read())
    run.log_metrics({"overall": metrics["overall"], "speed": metrics["speed"], **eval_figures(metrics)})
    for path in (sm.output.scores, sm.output.metrics):
        run.log_output(path)
