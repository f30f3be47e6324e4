"""`pipo generate`: JSONL prompts in, JSONL completions with statistics out (contract), resumable.

Input rows hold `prompt` (text; the chat template is applied) or `messages` (`role` and
`content` strings); ids, when given, are unique. Each output row is its input row plus
`row` (input index), `method`, `model`, `completions`, `token_ids`, `finish_reasons` and
`stats` (one dict per completion). Rows are appended one by one (flushed and synced).

Resume: the output's sidecar `<output>.meta.json` (see `pipo.provenance`) holds the
settings that made it (model fingerprint, method, sampling, seed, threshold, input
sha256, format). A rerun with the same settings skips rows already written (by `id`,
else by `row`) and repairs a last line cut short by a crash; other settings are refused
unless `--overwrite`. Row `i` is sampled with the seed `derive_seed(seed, i)` (the
engine's `seeds=`), so a resumed run writes the rows the uninterrupted run would have written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from typing import TYPE_CHECKING

from pipo.chat import check_messages
from pipo.engine import METHODS
from pipo.errors import InputError, PIPOError
from pipo.jsonl import append_jsonl, drop_partial_last_line, iter_jsonl, numbered_jsonl
from pipo.provenance import exit_after_rows_for_test, model_fingerprint, sha256_file, start_or_resume

if TYPE_CHECKING:  # torch, the engine and the sampler load only when generating: `--help` stays instant
    import torch

    from pipo.model.sampling import SamplingParams

DTYPES = ("auto", "bfloat16", "float16", "float32")  # --dtype: a torch dtype name, or the checkpoint's own
FORMAT = "pipo-generations/3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
MAX_N = 1024  # samples per prompt; more is a typo, not an experiment


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate completions for JSONL prompts (regular/pipo/mtp/eagle)")
    p.add_argument("--model", required=True, help="checkpoint folder (PIPO for --method pipo)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true", help="start over when the output was made with other settings")
    p.add_argument("--conf-threshold", type=float, default=0.5, help="pipo: keep token2 when confidence >= T")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-id", type=int, action="append", default=[], help="extra stop token id (repeatable)")
    p.add_argument("--eagle-k", type=int, default=3, help="eagle: tokens drafted per step")
    p.add_argument("--batch-size", type=int, default=8, help="sequences in flight at most (decode slots)")
    p.add_argument("--max-seq-len", type=int, default=8192,
                   help="prompt + completion tokens per sequence (a limit: KV blocks are taken as sequences grow)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, states, workspace and the KV block pool")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks in the pool (overrides the budget)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--backend", choices=("native", "sglang"), default="native")
    p.set_defaults(func=generate_file)


# ------------------------------------------------------------------ checks at the edge


def check_options(args: argparse.Namespace) -> SamplingParams:
    """Sampling parameters finite and in range, counts positive and bounded; the sampling params."""
    from pipo.model.sampling import SamplingParams

    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.min_p, args.presence_penalty)
    if not math.isfinite(args.conf_threshold):
        raise PIPOError(f"--conf-threshold must be a finite number, got {args.conf_threshold}")
    for flag, value, low, high in (("--n", args.n, 1, MAX_N), ("--max-new-tokens", args.max_new_tokens, 1, None),
                                   ("--batch-size", args.batch_size, 1, None), ("--eagle-k", args.eagle_k, 1, 64),
                                   ("--max-seq-len", args.max_seq_len, 2, None)):
        if value < low or (high is not None and value > high):
            raise PIPOError(f"{flag} must be in [{low}, {high or 'inf'}], got {value}")
    if any(t < 0 for t in args.stop_token_id):
        raise PIPOError(f"--stop-token-id must be >= 0, got {args.stop_token_id}")
    return sampling


def check_device(device: str | None) -> torch.device:
    """The device to run on; a CUDA device without CUDA (or a malformed name) is an error."""
    import torch

    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise PIPOError(f"--device {device!r} is not a device name ({err})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PIPOError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise PIPOError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def text_config(model: Path) -> dict:
    """The checkpoint folder's (text) config; a missing folder, config or tokenizer is an error naming it."""
    if not model.is_dir():
        raise InputError("no such model folder", file=model)
    config_file = model / "config.json"
    if not config_file.is_file():
        raise InputError("not a checkpoint folder (no config.json)", file=model)
    if not any((model / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); prompts need one "
                         "(save the backbone's tokenizer next to the weights)", file=model)
    config = json.loads(config_file.read_text(encoding="utf-8"))
    return config.get("text_config") or config


def available_bytes(device: torch.device) -> int:
    """Free memory of the device: CUDA's free bytes, else the host's available memory."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a `--dtype` choice; None for "auto" (the checkpoint's)."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def check_sizes(model: Path, config: dict, args: argparse.Namespace, device: torch.device) -> None:
    """Refuse `--max-seq-len` beyond the model's positions and KV memory that cannot fit, with the numbers.

    KV memory is paged: on CUDA the pool takes what the budget leaves, so only weights plus one
    sequence of `--max-seq-len` must fit; on CPU the default pool holds every slot at `--max-seq-len`.
    `--num-blocks` fixes the pool's size either way (32-position blocks, the engine's default)."""
    limit = config.get("max_position_embeddings")
    if limit and args.max_seq_len > limit:
        raise PIPOError(f"--max-seq-len {args.max_seq_len} exceeds the model's max_position_embeddings {limit}")
    heads = config.get("num_attention_heads") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads)
    layer_types = config.get("layer_types") or ["full_attention"] * config.get("num_hidden_layers", 0)
    attention_layers = sum(t == "full_attention" for t in layer_types) + 1  # + an MTP/draft layer
    dtype = torch_dtype(args.dtype) or (torch_dtype("bfloat16") if device.type == "cuda" else torch_dtype("float32"))
    if args.num_blocks:
        tokens, what = args.num_blocks * 32, f"--num-blocks {args.num_blocks}"
    elif device.type == "cuda":
        tokens, what = args.max_seq_len, f"one sequence of --max-seq-len {args.max_seq_len}"
    else:
        tokens, what = args.batch_size * args.max_seq_len, f"--batch-size {args.batch_size} x --max-seq-len {args.max_seq_len}"
    kv_bytes = 2 * tokens * attention_layers * kv_heads * head_dim * dtype.itemsize
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    free = available_bytes(device)
    if kv_bytes + weights > free:
        gib = 1 << 30
        raise PIPOError(
            f"{what} needs {kv_bytes / gib:.1f} GiB of KV cache ({attention_layers} attention layers x {kv_heads} "
            f"KV heads x {head_dim} dims, {dtype}) plus {weights / gib:.1f} GiB of weights; {device.type} has "
            f"{free / gib:.1f} GiB free: lower them")


def read_rows(path: Path) -> list[dict]:
    """Input rows; a malformed row or a repeated id is an error naming the file, line and field."""
    rows, first_line = [], {}
    for lineno, row in numbered_jsonl(path):
        if "messages" in row:
            check_messages(row["messages"], file=path, row=lineno)
        elif not (isinstance(row.get("prompt"), str) and row["prompt"].strip()):
            raise InputError("a row needs a non-empty 'prompt' string or a 'messages' list", file=path,
                             row=lineno, field="prompt")
        if "id" in row:
            if row["id"] in first_line:
                raise InputError(f"duplicate id {row['id']!r} (first on line {first_line[row['id']]})", file=path,
                                 row=lineno, field="id")
            first_line[row["id"]] = lineno
        rows.append({"row": row, "lineno": lineno})
    return rows


# ------------------------------------------------------------------ resume


def row_key(row: dict, index: int):
    return row["id"] if "id" in row else index


def done_keys(path: Path) -> set:
    """Keys of rows already in the output; a last line cut short by a crash is removed (its row reruns)."""
    if not path.exists():
        return set()
    drop_partial_last_line(path)
    return {row["id"] if "id" in row else row["row"] for row in iter_jsonl(path)}


def run_settings(args: argparse.Namespace, sampling: SamplingParams) -> dict:
    """What makes the rows: compared with the output's sidecar before resuming."""
    return {
        "format": FORMAT,
        "model": model_fingerprint(args.model),
        "method": args.method,
        "backend": args.backend,
        "dtype": args.dtype,
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                     "min_p": sampling.min_p, "presence_penalty": sampling.presence_penalty},
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "max_seq_len": args.max_seq_len,
        "seed": args.seed,
        "conf_threshold": args.conf_threshold,
        "eagle_k": args.eagle_k,
        "stop": list(args.stop),
        "stop_token_ids": list(args.stop_token_id),
        "input_sha256": sha256_file(args.input),
    }


def encode_row(tokenizer, row: dict, args: argparse.Namespace) -> list[int]:
    """A row's prompt ids; an empty prompt or one that leaves no room to generate is an error naming the line."""
    from pipo.engine.parts import encode_prompt

    ids = encode_prompt(tokenizer, row["row"].get("messages") or row["row"]["prompt"])
    field = "messages" if "messages" in row["row"] else "prompt"
    if len(ids) + len(ids) % 2 >= args.max_seq_len:
        raise InputError(f"{len(ids)} tokens leave no room to generate within --max-seq-len {args.max_seq_len} "
                         "(max_seq_len holds prompt and completion together)", file=args.input, row=row["lineno"],
                         field=field)
    return ids


def memory_options(args: argparse.Namespace) -> dict:
    """The KV memory budget for the native engine (the SGLang backend sizes its own)."""
    if args.backend != "native":
        return {}
    return {"gpu_memory_utilization": args.gpu_memory_utilization, "num_blocks": args.num_blocks}


def generate_file(args: argparse.Namespace) -> int:
    """Validate everything before loading the model; generate the missing rows; append each row."""
    from tqdm.auto import tqdm

    from pipo.engine.engine import open_engine
    from pipo.engine.parts import load_tokenizer
    from pipo.model.sampling import derive_seed

    sampling = check_options(args)
    device = check_device(args.device)
    model = Path(args.model)
    check_sizes(model, text_config(model), args, device)
    rows = read_rows(args.input)
    tokenizer = load_tokenizer(model)
    prompts = [encode_row(tokenizer, r, args) for r in rows]
    info = {"model_path": str(model), "input": str(args.input), "device": str(device), "batch_size": args.batch_size}
    resumed = start_or_resume(args.output, run_settings(args, sampling), info, overwrite=args.overwrite)
    done = done_keys(args.output) if resumed else set()
    todo = [(i, r, prompts[i]) for i, r in enumerate(rows) if row_key(r["row"], i) not in done]
    if not todo:
        return 0
    engine = open_engine(
        model, args.method, args.backend, tokenizer=tokenizer, device=device, dtype=torch_dtype(args.dtype),
        max_batch_size=args.batch_size, max_seq_len=args.max_seq_len, conf_threshold=args.conf_threshold,
        eagle_k=args.eagle_k, **memory_options(args),
    )
    for _, r, ids in todo:
        engine.check_prompt(ids, f"{args.input}:{r['lineno']}: prompt")
    chunk = max(1, 4 * args.batch_size // args.n)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=f"pipo generate ({args.method})") as bar:
        for lo in range(0, len(todo), chunk):
            batch = todo[lo : lo + chunk]
            # Row i's samples come from derive_seed(seed, i) alone: a resumed run repeats the uninterrupted one.
            results = engine.generate([ids for _, _, ids in batch], sampling, max_new_tokens=args.max_new_tokens,
                                      n=args.n, stop=args.stop, stop_token_ids=args.stop_token_id,
                                      seeds=[derive_seed(args.seed, index) for index, _, _ in batch])
            for written, ((index, r, _), completions) in enumerate(zip(batch, results), start=lo + 1):
                write_row(f, args, index, r["row"], completions)
                bar.update(1)
                exit_after_rows_for_test(written)
    return 0


def write_row(f, args: argparse.Namespace, index: int, row: dict, completions) -> None:
    """Append one output row: the input row plus what was generated for it."""
    append_jsonl(f, {
        **row,
        "row": index,
        "method": args.method,
        "model": str(args.model),
        "completions": [c.text for c in completions],
        "token_ids": [c.token_ids for c in completions],
        "finish_reasons": [c.finish_reason for c in completions],
        "stats": [c.stats.to_dict() for c in completions],
    })
