# Evaluation: generate {variant} x {method} x {benchmark} x {shard}, then score each
# (variant, method, benchmark) over its shards.


rule generate:
    input:
        records=f"{R}/data/bench/{{benchmark}}.jsonl",
        model=lambda wc: variant_dir(wc.variant),
    output:
        f"{R}/eval/{{variant}}/{{method}}/{{benchmark}}/{{shard}}.generations.jsonl",
    params:
        stage="eval",
        options=generate_options("eval"),
        prompt_budget=config["eval"]["prompt_budget"],
        shards=lambda wc: config["eval"]["benchmarks"][wc.benchmark]["shards"],
        method=lambda wc: wc.method,
        model_label=lambda wc: variant_model(wc.variant),
    log:
        log_file("generate", "variant", "method", "benchmark", "shard"),
    benchmark:
        benchmark_file("generate", "variant", "method", "benchmark", "shard")
    resources:
        **slurm_resources("generate"),
    threads: threads_of("generate")
    conda:
        "../envs/serve.yaml"
    script:
        "../workflow_scripts/generate.py"


rule score:
    input:
        generations=lambda wc: expand(
            f"{R}/eval/{wc.variant}/{wc.method}/{wc.benchmark}/{{shard}}.generations.jsonl",
            shard=shards("eval", wc.benchmark),
        ),
    output:
        generations=f"{R}/eval/{{variant}}/{{method}}/{{benchmark}}/generations.jsonl",
        scores=f"{R}/eval/{{variant}}/{{method}}/{{benchmark}}/scores.jsonl",
        metrics=f"{R}/eval/{{variant}}/{{method}}/{{benchmark}}/metrics.json",
    params:
        stage="eval",
        k=config["eval"]["n"],
        workers=config["eval"]["score_workers"],
        model_label=lambda wc: variant_model(wc.variant),
        method_label=lambda wc: method_label(wc.variant, wc.method),
    log:
        log_file("score", "variant", "method", "benchmark"),
    benchmark:
        benchmark_file("score", "variant", "method", "benchmark")
    resources:
        **slurm_resources("score"),
    threads: threads_of("score")
    conda:
        "../envs/eval.yaml"
    script:
        "../workflow_scripts/score.py"
