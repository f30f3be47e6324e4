# Results tables (main.{csv,md,tex}, speed.{csv,md}) and accuracy-vs-speed plots.


rule report:
    input:
        METRICS,
    output:
        tables=REPORT_FILES,
        figures=directory(f"{R}/figures"),
    params:
        method_order=config["report"]["method_order"],
    log:
        log_file("report"),
    benchmark:
        benchmark_file("report")
    resources:
        **slurm_resources("report"),
    threads: threads_of("report")
    conda:
        "../envs/eval.yaml"
    script:
        "../workflow_scripts/report.py"
