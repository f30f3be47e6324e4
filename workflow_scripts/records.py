"""Rules prompts / benchmark (`params.kind`): a prompt source or a benchmark as normalised records (JSONL)."""
from pipo.data.sources import load_prompt_source
from pipo.eval.tasks import load_benchmark
from pipo.jsonl import write_jsonl
from pipo.workflow import rule_script

sm = snakemake  # noqa: F821 (injected by Snakemake)
dataset, name, task = sm.params.dataset, sm.params.name, sm.params.task
with rule_script(sm, "data", {"dataset": dataset, "task": task}, benchmark=name) as run:
    if sm.params.kind == "prompts":
        records = load_prompt_source(name, dataset["source"], limit=dataset["limit"], seed=sm.params.seed,
                                     sft_fraction=sm.params.sft_fraction, task=task)
    else:
        records = load_benchmark(name, dataset["source"], limit=dataset["limit"], seed=sm.params.seed, task=task)
    write_jsonl(sm.output[0], records)
    run.log_metrics({"records": len(records)})
    run.log_output(sm.output[0])
