# Student and teacher checkpoints: hub snapshots, or (demo) tiny models pretrained from scratch.
# A model whose `source` is a local folder needs no rule: it is used as is.

if HUB_MODELS:

    rule download_model:
        output:
            directory(f"{R}/models/{{model}}"),
        wildcard_constraints:
            model=alternatives(HUB_MODELS),
        params:
            model=lambda wc: MODELS[wc.model],
        log:
            log_file("download_model", "model"),
        benchmark:
            benchmark_file("download_model", "model")
        resources:
            **slurm_resources("download_model"),
        threads: threads_of("download_model")
        conda:
            "../envs/train.yaml"
        script:
            "../workflow_scripts/download_model.py"


if PRETRAINED:

    rule pretrain_model:
        output:
            directory(f"{R}/models/{{model}}"),
        wildcard_constraints:
            model=alternatives(PRETRAINED),
        params:
            model=lambda wc: MODELS[wc.model],
            task=config["data"]["synthetic"],
        log:
            log_file("pretrain_model", "model"),
        benchmark:
            benchmark_file("pretrain_model", "model")
        resources:
            **slurm_resources("pretrain_model"),

        priority: CRITICAL_PATH
        threads: threads_of("pretrain_model")
        conda:
            "../envs/train.yaml"
        script:
            "../workflow_scripts/pretrain_model.py"
