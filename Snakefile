"""PIPO workflow: teacher rollouts -> SFT/RL data -> SFT -> merge -> OPD -> merge -> evaluation -> report.

    snakemake --cores all all                                  # the paper's setup (config.yaml)
    snakemake --profile slurm all                              # the same DAG on a SLURM cluster
    snakemake --configfile presets/demo.yaml --cores 2 all     # tiny CPU demo, minutes

The config is validated against rules/config.schema.yaml before anything runs, and every
default the schema declares is filled in (rules read `config[section][key]`); any value
can be overridden on the command line, nested ones as YAML that Snakemake merges into the
section: `--config 'sft={learning_rate: 5.0e-5}' 'eval={n: 8}'`.
"""
import os

from pipo.workflow import validate_config_or_exit


# A --configfile (a preset) is a complete config that replaces config.yaml, not a patch on
# it: merging would mix, e.g., the paper's hub benchmarks into the demo's synthetic ones.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"



validate_config_or_exit(config, os.path.join(workflow.basedir, "rules", "config.schema.yaml"))


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/data.smk"
include: "rules/rollout.smk"
include: "rules/train.smk"
include: "rules/eval.smk"
include: "rules/report.smk"


rule all:
    input:
        REPORT_FILES,


onstart:
    prepare_tracking()
