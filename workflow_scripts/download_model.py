"""Rule download_model: snapshot a hub checkpoint into results/models/<name>."""
from huggingface_hub import snapshot_download

from pipo.workflow import rule_script

model = snakemake.params.model  # noqa: F821 (injected by Snakemake)
with rule_script(snakemake, "models", {"model": model}, model=model["name"]) as run:  # noqa: F821
    snapshot_download(model["source"], revision=model["revision"], local_dir=snakemake.output[0])  # noqa: F821
    run.log_output(snakemake.output[0], "model")  # noqa: F821
