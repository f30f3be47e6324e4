"""Rules grade / score: grade generations (`score_generations`); log the metrics to MLflow."""
from pipo.eval.sandbox import SandboxConfig
from pipo.eval.scoring import score_generations
from pipo.tracking import eval_figures
from pipo.workflow import concat_files, rule_script

sm = snakemake  # noqa: F821 (injected by Snakemake)
labels = {key: value for key, value in {"model": sm.params.model_label, "method": sm.params.method_label,
                                        "benchmark": sm.wildcards.get("benchmark")}.items() if value is not None}
params = {"k": sm.params.k, "workers": sm.params.workers, **labels}  # params: the compare view lists them per run
with rule_script(sm, sm.params.stage, params, **labels) as run:
    shards = [sm.input.generations] if isinstance(sm.input.generations, str) else list(sm.input.generations)
    generations = sm.output.get("generations") or shards[0]
    if sm.output.get("generations"):  # score: the shards of one (variant, method, benchmark) as one file
        concat_files(shards, generations)
    metrics = score_generations(generations, sm.output.scores, sm.output.metrics, k=sm.params.k,
                                workers=sm.params.workers, sandbox=SandboxConfig(), progress=False,
                                model_label=sm.params.model_label, method_label=sm.params.method_label)
    run.log_metrics({"overall": metrics["overall"], "speed": metrics["speed"], **eval_figures(metrics)})
    for path in (sm.output.scores, sm.output.metrics):
        run.log_output(path)
