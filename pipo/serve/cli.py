"""`pipo serve`: an OpenAI-compatible HTTP server on one checkpoint and decoding method."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipo.engine import METHODS
from pipo.engine.options import DTYPES, ENGINE_DEFAULTS as DEFAULTS

SERVE_BATCH_SIZE = 32  # a server batches more requests than `pipo generate`'s default


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint through the OpenAI HTTP API (chat and completions)")
    p.add_argument("--model", required=True, type=Path, help="checkpoint folder (PIPO for --method pipo)")
    p.add_argument("--method", default="pipo", choices=METHODS)
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--conf-threshold", type=float, default=DEFAULTS.conf_threshold,
                   help="pipo: keep token2 when confidence >= T")
    p.add_argument("--eagle-k", type=int, default=DEFAULTS.eagle_k, help="eagle: tokens drafted per step")
    p.add_argument("--batch-size", type=int, default=SERVE_BATCH_SIZE, help="sequences decoded together at most")
    p.add_argument("--max-seq-len", type=int, default=DEFAULTS.max_seq_len,
                   help="prompt + completion tokens per sequence")
    p.add_argument("--reasoning-parser", choices=("none", "think"), default="none",
                   help="think: text before </think> goes to reasoning_content")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are cancelled")
    p.add_argument("--gpu-memory-utilization", type=float, default=DEFAULTS.gpu_memory_utilization,
                   help="share of GPU memory for weights + KV blocks + workspaces")
    p.add_argument("--num-blocks", type=int, default=DEFAULTS.num_blocks,
                   help="KV blocks in the pool (overrides the budget)")
    p.add_argument("--device", default=DEFAULTS.device)
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULTS.dtype)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pipo.engine.generate import torch_dtype
    from pipo.engine.engine import Engine
    from pipo.serve.app import create_app
    from pipo.serve.runner import EngineRunner

    engine = Engine(args.model, args.method, device=args.device, dtype=torch_dtype(args.dtype),
                    max_batch_size=args.batch_size, max_seq_len=args.max_seq_len, conf_threshold=args.conf_threshold,
                    eagle_k=args.eagle_k, gpu_memory_utilization=args.gpu_memory_utilization,
                    num_blocks=args.num_blocks)
    runner = EngineRunner(engine, split_reasoning=args.reasoning_parser == "think")
    app = create_app(runner, args.served_model_name or args.model.name)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.shutdown_timeout,
                log_level="info")
    return 0
