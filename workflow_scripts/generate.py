"""Rules rollout / generate: one shard of records decoded with `generate_jsonl` (resumable)."""
from pipo.engine.options import GenerateOptions
from pipo.workflow import generate_shard, rule_script

sm = snakemake  # noqa: F821 (injected by Snakemake)
options = GenerateOptions.from_section(sm.params.options)
with rule_script(sm, sm.params.stage, {sm.params.stage: sm.params.options}, model=sm.params.model_label,
                 method=sm.params.method) as run:
    generate_shard(sm.input.records, sm.input.model, sm.params.method, sm.output[0], options,
                   prompt_budget=sm.params.prompt_budget, shard=int(sm.wildcards.shard), shards=sm.params.shards)
    run.log_output(sm.output[0])
