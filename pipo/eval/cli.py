"""`pipo` sub-commands of the evaluation stage.

Each sub-command is one small `_add_<name>(subparsers)` function that builds its parser
and sets `func=`; `register` just calls them.
"""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the evaluation sub-commands to the `pipo` parser."""
    _add_benchmark(subparsers)
    _add_score(subparsers)


def _add_benchmark(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="load a benchmark into a records JSONL (the input of `pipo generate`)",
        description="Load a benchmark from the hub or a local copy into normalised records. With "
                    "--tokenizer, prompts marked for truncation (LongBench v2) are cut in the middle to "
                    "the prompt budget measured with that tokenizer, as the workflow's generate rule does.",
    )
    parser.add_argument("--name", required=True, help="benchmark: aime25, gpqa_diamond, livecodebench, longbench_v2, ...")
    parser.add_argument("--output", required=True, help="records JSONL, written atomically")
    parser.add_argument("--source", default=None, help="hub id or local copy in the hub's layout (default: the hub repo)")
    parser.add_argument("--limit", type=int, default=None, help="keep the first N records")
    parser.add_argument("--seed", type=int, default=0, help="seed of per-question choice shuffles (default 0)")
    parser.add_argument("--tokenizer", default=None, help="checkpoint folder or hub id whose tokenizer measures prompts")
    parser.add_argument("--max-seq-len", type=int, default=None, help="as given to `pipo generate`")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="as given to `pipo generate`")
    parser.add_argument("--prompt-budget", type=int, default=None,
                        help="prompt tokens allowed (default: --max-seq-len minus --max-new-tokens)")
    parser.set_defaults(func=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from pipo.eval.tasks import load_benchmark  # heavy imports only when used
    from pipo.eval.truncation import fit_to_model, needs_fitting
    from pipo.jsonl import write_jsonl

    records = load_benchmark(args.name, args.source, limit=args.limit, seed=args.seed)
    if args.tokenizer is not None:
        limits = {"max_seq_len": args.max_seq_len, "max_new_tokens": args.max_new_tokens,
                  "prompt_budget": args.prompt_budget}
        records = fit_to_model(records, args.tokenizer, limits)
    elif needs_fitting(records):
        print(f"pipo benchmark: note: {args.name} prompts are kept whole; give --tokenizer to fit them "
              "to the model's prompt budget", file=sys.stderr)
    write_jsonl(args.output, records)
    print(f"{len(records)} records -> {args.output}")
    return 0


def _add_score(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score", help="grade a generations JSONL and write scores + metrics (resumable)",
        description="Grade every completion of a generations JSONL, append one row per "
                    "problem to the scores JSONL (a killed run resumes), write metrics.json.",
    )
    parser.add_argument("--generations", required=True, help="generations JSONL (from `pipo generate`)")
    parser.add_argument("--scores", required=True, help="scores JSONL, appended to and resumed")
    parser.add_argument("--metrics", required=True, help="metrics JSON, written atomically")
    parser.add_argument("--k", type=int, default=4, help="k of avg@k / pass@k (default 4)")
    parser.add_argument("--workers", type=int, default=1, help="grading processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--unsafe-no-sandbox", action="store_true",
                        help="if bubblewrap cannot isolate model-written code, run it anyway WITHOUT a "
                             "sandbox (it can then read and change your files); recorded in the metrics")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over when the scores were made for other completions or grading settings")
    parser.add_argument("--model-label", default=None, help="model name for the results table (default: from the rows)")
    parser.add_argument("--method-label", default=None,
                        help="method name for the results table, e.g. pipo-sft (default: from the rows)")
    parser.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from pipo.eval.sandbox import SandboxConfig  # heavy imports only when used
    from pipo.eval.scoring import score_generations

    sandbox = SandboxConfig(unsafe_no_sandbox=args.unsafe_no_sandbox)
    if args.unsafe_no_sandbox:
        print("pipo score: WARNING: --unsafe-no-sandbox: if bubblewrap does not work, model-written code "
              "runs WITHOUT isolation", file=sys.stderr)
    metrics = score_generations(args.generations, args.scores, args.metrics, k=args.k, workers=args.workers,
                                sandbox=sandbox, progress=not args.no_progress, model_label=args.model_label,
                                method_label=args.method_label, overwrite=args.overwrite)
    print(json.dumps({"overall": metrics["overall"], "num_problems": metrics["num_problems"],
                      "code_sandbox": metrics["code_sandbox"]}, indent=2))
    return 0
