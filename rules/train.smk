# PIPO SFT from the base student, OPD from the merged SFT checkpoint, each merged into a
# standalone PIPO checkpoint. A training rule's output is the stage's completion record
# (pipo_stage.json, written last): its checkpoint-* folders survive a failed job, so a
# rerun resumes from the newest one; `--forcerun` deletes the record, and the stage then
# trains from scratch (as it does when its settings or inputs changed).


rule sft:
    input:
        data=f"{R}/data/sft_cache",
        model=model_dir(STUDENT["name"]),
    output:
        f"{R}/train/{{model}}/sft/pipo_stage.json",
    wildcard_constraints:
        model=alternatives([STUDENT["name"]]),
    params:
        stage="sft",
        settings=config["sft"],
    log:
        log_file("sft", "model"),
    benchmark:
        benchmark_file("sft", "model")
    resources:
        **slurm_resources("sft"),


    priority: CRITICAL_PATH
    threads: threads_of("sft")
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/train.py"


rule opd:
    input:
        data=f"{R}/data/rl.jsonl",
        model=f"{R}/checkpoints/{{model}}/pipo-sft",
        teacher=model_dir(TEACHER["name"]),
    output:
        f"{R}/train/{{model}}/opd/pipo_stage.json",
    wildcard_constraints:
        model=alternatives([STUDENT["name"]]),
    params:
        stage="opd",
        settings=config["opd"],
    log:
        log_file("opd", "model"),
    benchmark:
        benchmark_file("opd", "model")
    resources:
        **slurm_resources("opd"),


    priority: CRITICAL_PATH
    threads: threads_of("opd")
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/train.py"


rule merge:
    input:
        f"{R}/train/{{model}}/{{stage}}/pipo_stage.json",
    output:
        directory(f"{R}/checkpoints/{{model}}/pipo-{{stage}}"),
    wildcard_constraints:
        model=alternatives([STUDENT["name"]]),
    log:
        log_file("merge", "model", "stage"),
    benchmark:
        benchmark_file("merge", "model", "stage")
    resources:
        **slurm_resources("merge"),


    priority: CRITICAL_PATH
    threads: threads_of("merge")
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/merge.py"
