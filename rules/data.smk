# Prompt sources and benchmarks as normalised records; SFT / RL rows from graded rollouts;
# the tokenized SFT cache.


rule prompts:
    output:
        f"{R}/data/prompts/{{dataset}}.jsonl",
    params:
        kind="prompts",
        name=lambda wc: wc.dataset,
        dataset=lambda wc: config["rollout"]["datasets"][wc.dataset],
        sft_fraction=config["rollout"]["sft_fraction"],
        seed=config["rollout"]["seed"],
        task=config["data"]["synthetic"],
    log:
        log_file("prompts", "dataset"),
    benchmark:
        benchmark_file("prompts", "dataset")
    resources:
        **slurm_resources("prompts"),


    priority: CRITICAL_PATH
    threads: threads_of("prompts")
    conda:
        "../envs/eval.yaml"
    script:
        "../workflow_scripts/records.py"


rule benchmark:
    output:
        f"{R}/data/bench/{{benchmark}}.jsonl",
    params:
        kind="benchmark",
        name=lambda wc: wc.benchmark,
        dataset=lambda wc: config["eval"]["benchmarks"][wc.benchmark],
        seed=config["eval"]["seed"],
        task=config["data"]["synthetic"],
    log:
        log_file("benchmark", "benchmark"),
    benchmark:
        benchmark_file("benchmark", "benchmark")
    resources:
        **slurm_resources("benchmark"),
    threads: threads_of("benchmark")
    conda:
        "../envs/eval.yaml"
    script:
        "../workflow_scripts/records.py"


rule build_sft:
    input:
        rollouts=rollout_files(".jsonl"),
        scores=rollout_files(".scores.jsonl"),
    output:
        f"{R}/data/sft.jsonl",
    params:
        kind="sft",
        data=config["data"],
    log:
        log_file("build_sft"),
    benchmark:
        benchmark_file("build_sft")
    resources:
        **slurm_resources("build_sft"),


    priority: CRITICAL_PATH
    threads: threads_of("build_sft")
    conda:
        "../envs/eval.yaml"
    script:
        "../workflow_scripts/build_data.py"


use rule build_sft as build_rl with:
    output:
        f"{R}/data/rl.jsonl",
    params:
        kind="rl",
        data=config["data"],
    log:
        log_file("build_rl"),
    benchmark:
        benchmark_file("build_rl")
    resources:
        **slurm_resources("build_rl"),
    threads: threads_of("build_rl")


rule cache_sft:
    input:
        data=f"{R}/data/sft.jsonl",
        model=model_dir(STUDENT["name"]),
    output:
        directory(f"{R}/data/sft_cache"),
    params:
        model_type=config["sft"]["model_type"],
        max_length=config["data"]["cache_max_length"],
    log:
        log_file("cache_sft"),
    benchmark:
        benchmark_file("cache_sft")
    resources:
        **slurm_resources("cache_sft"),


    priority: CRITICAL_PATH
    threads: threads_of("cache_sft")
    conda:
        "../envs/train.yaml"
    script:
        "../workflow_scripts/cache_sft.py"
