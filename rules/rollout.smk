# Teacher rollouts (regular decoding) on the training prompts, shard by shard, and their grades.


rule rollout:
    input:
        records=f"{R}/data/prompts/{{dataset}}.jsonl",
        model=model_dir(TEACHER["name"]),
    output:
        f"{R}/rollouts/{{teacher}}/{{dataset}}/{{shard}}.jsonl",
    wildcard_constraints:
        teacher=alternatives([TEACHER["name"]]),
    params:
        stage="rollout",
        options=generate_options("rollout"),
        prompt_budget=None,
        shards=lambda wc: config["rollout"]["datasets"][wc.dataset]["shards"],
        method="regular",
        model_label=TEACHER["name"],
    log:
        log_file("rollout", "teacher", "dataset", "shard"),
    benchmark:
        benchmark_file("rollout", "teacher", "dataset", "shard")
    resources:
        **slurm_resources("rollout"),


    priority: CRITICAL_PATH
    threads: threads_of("rollout")
    conda:
        "../envs/serve.yaml"
    script:
        "../workflow_scripts/generate.py"


rule grade:
    input:
        generations=f"{R}/rollouts/{{teacher}}/{{dataset}}/{{shard}}.jsonl",
    output:
        scores=f"{R}/rollouts/{{teacher}}/{{dataset}}/{{shard}}.scores.jsonl",
        metrics=f"{R}/rollouts/{{teacher}}/{{dataset}}/{{shard}}.metrics.json",
    wildcard_constraints:
        teacher=alternatives([TEACHER["name"]]),
    params:
        stage="grade",
        k=config["rollout"]["n"],
        workers=config["rollout"]["grade_workers"],
        model_label=TEACHER["name"],
        method_label="rollout",
    log:
        log_file("grade", "teacher", "dataset", "shard"),
    benchmark:
        benchmark_file("grade", "teacher", "dataset", "shard")
    resources:
        **slurm_resources("grade"),


    priority: CRITICAL_PATH
    threads: threads_of("grade")
    conda:
        "../envs/eval.yaml"
    script:
        "../workflow_scripts/score.py"
