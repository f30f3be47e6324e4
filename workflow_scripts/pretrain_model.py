"""Rule pretrain_model (demo): a tiny model trained from scratch on the synthetic task."""
from dataclasses import asdict

from pipo.train.pretrain import PretrainConfig, pretrain
from pipo.workflow import rule_script

model = snakemake.params.model  # noqa: F821 (injected by Snakemake)
config = PretrainConfig.from_dict({**model["pretrain"], "task": snakemake.params.task})  # noqa: F821
with rule_script(snakemake, "pretrain", {"pretrain": asdict(config)}, model=model["name"]) as run:  # noqa: F821
    losses = pretrain(snakemake.output[0], config, log=run.log_metrics)  # noqa: F821
    run.log_metrics({"final_loss": losses[-1]}, step=len(losses))
    run.log_output(snakemake.output[0], "model")  # noqa: F821
