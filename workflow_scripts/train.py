"""Rules sft / opd (`params.stage`): LoRA training through ms-swift; the trainer's callback logs curves into this
rule's run."""
from pathlib import Path

from pipo.train.stages import run_opd, run_sft
from pipo.workflow import rule_script

sm = snakemake  # noqa: F821 (injected by Snakemake)
name = sm.params.stage
stage = {**sm.params.settings, "model": sm.input.model, "dataset": sm.input.data,
         "output_dir": str(Path(sm.output[0]).parent)}
if name == "opd":
    stage["teacher"] = sm.input.teacher
with rule_script(sm, name, {name: stage}, model=sm.wildcards.model) as run:
    checkpoint = {"sft": run_sft, "opd": run_opd}[name](stage)
    run.log_output(checkpoint, "checkpoint")
    run.log_output(sm.output[0])
