"""`pipo generate`: the flags of `pipo.engine.generate.generate_jsonl` (contract and resume rules there).

Every default comes from `pipo.engine.options.GenerateOptions`; parsing builds one and calls
the library function. Nothing here imports torch: `pipo generate --help` stays instant.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipo.engine import METHODS
from pipo.engine.options import BACKENDS, DTYPES, GenerateOptions

DEFAULTS = GenerateOptions()


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate completions for JSONL prompts (regular/pipo/mtp/eagle)")
    p.add_argument("--model", required=True, help="checkpoint folder (PIPO for --method pipo)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true", help="start over when the output was made with other settings")
    add_engine_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    p.add_argument("--temperature", type=float, default=DEFAULTS.temperature)
    p.add_argument("--top-p", type=float, default=DEFAULTS.top_p)
    p.add_argument("--top-k", type=int, default=DEFAULTS.top_k)
    p.add_argument("--min-p", type=float, default=DEFAULTS.min_p)
    p.add_argument("--presence-penalty", type=float, default=DEFAULTS.presence_penalty)
    p.add_argument("--n", type=int, default=DEFAULTS.n, help="samples per prompt")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-id", type=int, action="append", default=[], help="extra stop token id (repeatable)")
    p.set_defaults(func=_run_generate)


def add_engine_flags(p: argparse.ArgumentParser, defaults: GenerateOptions = DEFAULTS) -> None:
    """The `EngineOptions` flags."""
    p.add_argument("--conf-threshold", type=float, default=defaults.conf_threshold,
                   help="pipo: keep token2 when confidence >= T")
    p.add_argument("--eagle-k", type=int, default=defaults.eagle_k, help="eagle: tokens drafted per step")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="sequences in flight at most (decode slots)")
    p.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len,
                   help="prompt + completion tokens per sequence (a limit: KV blocks are taken as sequences grow)")
    p.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization,
                   help="fraction of GPU memory for weights, states, workspace and the KV block pool")
    p.add_argument("--num-blocks", type=int, default=defaults.num_blocks,
                   help="KV blocks in the pool (overrides the budget)")
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--dtype", choices=DTYPES, default=defaults.dtype)
    p.add_argument("--backend", choices=BACKENDS, default=defaults.backend)


def _run_generate(args: argparse.Namespace) -> int:
    from pipo.engine.generate import generate_jsonl

    values = {**vars(args), "stop": tuple(args.stop), "stop_token_ids": tuple(args.stop_token_id)}
    options = GenerateOptions(**{k: v for k, v in values.items() if k in GenerateOptions.__dataclass_fields__})
    generate_jsonl(args.model, args.method, args.input, args.output, options, overwrite=args.overwrite)
    return 0
