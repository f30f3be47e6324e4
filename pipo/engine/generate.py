"""`generate_jsonl`: JSONL prompts in, JSONL completions with statistics out (contract), resumable.

Input rows hold `prompt` (text; the chat template is applied) or `messages` (`role` and
`content` strings); ids, when given, are unique. Each output row is its input row plus
`row` (input index), `method`, `model`, `completions`, `token_ids`, `finish_reasons` and
`stats` (one dict per completion). Rows are appended one by one (flushed and synced).

Resume: the output's sidecar `<output>.meta.json` (see `pipo.provenance`) holds the
settings that made it (model fingerprint, method, sampling, seed, threshold, input
sha256, format). A rerun with the same settings skips rows already written (by `id`,
else by `row`) and repairs a last line cut short by a crash; other settings are refused
unless `overwrite`. Row `i` is sampled with the seed `derive_seed(seed, i)` (the
engine's `seeds=`), so a resumed run writes the rows the uninterrupted run would have written.
`pipo generate` and the workflow's rollout / generate rules both call `generate_jsonl`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pipo.chat import check_messages
from pipo.engine import METHODS, prompt_positions
from pipo.engine.options import BACKENDS, DTYPES, EngineOptions, GenerateOptions
from pipo.errors import InputError, PIPOError
from pipo.jsonl import append_jsonl, drop_partial_last_line, iter_jsonl, numbered_jsonl
from pipo.provenance import exit_after_rows_for_test, model_fingerprint, sha256_file, start_or_resume

if TYPE_CHECKING:  # torch, the engine and the sampler load only when generating
    import torch

    from pipo.model.sampling import SamplingParams

FORMAT = "pipo-generations/3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
MAX_N = 1024  # samples per prompt; more is a typo, not an experiment


# ------------------------------------------------------------------ checks at the edge


def check_options(options: GenerateOptions) -> SamplingParams:
    """Sampling parameters finite and in range, counts positive and bounded; the sampling params."""
    from pipo.model.sampling import SamplingParams

    sampling = SamplingParams(options.temperature, options.top_p, options.top_k, options.min_p,
                              options.presence_penalty)
    if not math.isfinite(options.conf_threshold):
        raise PIPOError(f"conf_threshold must be a finite number, got {options.conf_threshold}")
    for name, low, high in (("n", 1, MAX_N), ("max_new_tokens", 1, None), ("batch_size", 1, None),
                            ("eagle_k", 1, 64), ("max_seq_len", 2, None)):
        value = getattr(options, name)
        if value < low or (high is not None and value > high):
            raise PIPOError(f"{name} must be in [{low}, {high or 'inf'}], got {value}")
    if options.backend not in BACKENDS or options.dtype not in DTYPES:
        raise PIPOError(f"backend must be one of {BACKENDS} and dtype one of {DTYPES}, got {options.backend!r} "
                        f"and {options.dtype!r}")
    if any(t < 0 for t in options.stop_token_ids):
        raise PIPOError(f"stop_token_ids must be >= 0, got {list(options.stop_token_ids)}")
    return sampling


def check_device(device: str | None) -> torch.device:
    """The device to run on; a CUDA device without CUDA (or a malformed name) is an error."""
    import torch

    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise PIPOError(f"device {device!r} is not a device name ({err})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PIPOError(f"device {device}: CUDA is not available on this machine (torch {torch.__version__})")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise PIPOError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
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
    """The torch dtype of a `dtype` option; None for "auto" (the checkpoint's)."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def check_sizes(model: Path, config: dict, options: EngineOptions, device: torch.device) -> None:
    """Refuse `max_seq_len` beyond the model's positions and KV memory that cannot fit, with the numbers.

    KV memory is paged: on CUDA the pool takes what the budget leaves, so only weights plus one
    sequence of `max_seq_len` must fit; on CPU the default pool holds every slot at `max_seq_len`.
    `num_blocks` fixes the pool's size either way (32-position blocks, the engine's default)."""
    limit = config.get("max_position_embeddings")
    if limit and options.max_seq_len > limit:
        raise PIPOError(f"max_seq_len {options.max_seq_len} exceeds the model's max_position_embeddings {limit}")
    heads = config.get("num_attention_heads") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads)
    layer_types = config.get("layer_types") or ["full_attention"] * config.get("num_hidden_layers", 0)
    attention_layers = sum(t == "full_attention" for t in layer_types) + 1  # + an MTP/draft layer
    dtype = torch_dtype(options.dtype) or (torch_dtype("bfloat16") if device.type == "cuda" else torch_dtype("float32"))
    if options.num_blocks:
        tokens, what = options.num_blocks * 32, f"num_blocks {options.num_blocks}"
    elif device.type == "cuda":
        tokens, what = options.max_seq_len, f"one sequence of max_seq_len {options.max_seq_len}"
    else:
        tokens, what = (options.batch_size * options.max_seq_len,
                        f"batch_size {options.batch_size} x max_seq_len {options.max_seq_len}")
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


def run_settings(model: Path, method: str, input: Path, options: GenerateOptions, sampling: SamplingParams) -> dict:
    """What makes the rows: compared with the output's sidecar before resuming."""
    return {
        "format": FORMAT,
        "model": model_fingerprint(model),
        "method": method,
        "backend": options.backend,
        "dtype": options.dtype,
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                     "min_p": sampling.min_p, "presence_penalty": sampling.presence_penalty},
        "n": options.n,
        "max_new_tokens": options.max_new_tokens,
        "max_seq_len": options.max_seq_len,
        "seed": options.seed,
        "conf_threshold": options.conf_threshold,
        "eagle_k": options.eagle_k,
        "stop": list(options.stop),
        "stop_token_ids": list(options.stop_token_ids),
        "input_sha256": sha256_file(input),
    }


def encode_row(tokenizer, row: dict, input: Path, max_seq_len: int, method: str) -> list[int]:
    """A row's prompt ids; an empty prompt or one that leaves no room to generate is an error naming the line."""
    from pipo.engine.parts import encode_prompt

    ids = encode_prompt(tokenizer, row["row"].get("messages") or row["row"]["prompt"])
    field = "messages" if "messages" in row["row"] else "prompt"
    if prompt_positions(len(ids), method) >= max_seq_len:
        raise InputError(f"{len(ids)} tokens leave no room to generate within max_seq_len {max_seq_len} "
                         "(it holds prompt and completion together)", file=input, row=row["lineno"], field=field)
    return ids


def memory_options(options: EngineOptions) -> dict:
    """The KV memory budget for the native engine (the SGLang backend sizes its own)."""
    if options.backend != "native":
        return {}
    return {"gpu_memory_utilization": options.gpu_memory_utilization, "num_blocks": options.num_blocks}


def generate_jsonl(
    model: str | Path,
    method: str,
    input: str | Path,
    output: str | Path,
    options: GenerateOptions = GenerateOptions(),
    *,
    overwrite: bool = False,
) -> Path:
    """Decode every row of `input` with `method` into `output` (rows appended one by one, resumable).

    Everything is checked before the model loads; rows already in `output` from a run with
    the same settings are skipped; other settings are refused unless `overwrite`.
    """
    from tqdm.auto import tqdm

    from pipo.engine.engine import open_engine
    from pipo.engine.parts import load_tokenizer
    from pipo.model.sampling import derive_seed

    if method not in METHODS:
        raise PIPOError(f"method must be one of {METHODS}, got {method!r}")
    sampling = check_options(options)
    device = check_device(options.device)
    model, input, output = Path(model), Path(input), Path(output)
    check_sizes(model, text_config(model), options, device)
    rows = read_rows(input)
    tokenizer = load_tokenizer(model)
    prompts = [encode_row(tokenizer, r, input, options.max_seq_len, method) for r in rows]
    info = {"model_path": str(model), "input": str(input), "device": str(device), "batch_size": options.batch_size}
    resumed = start_or_resume(output, run_settings(model, method, input, options, sampling), info,
                              overwrite=overwrite)
    done = done_keys(output) if resumed else set()
    todo = [(i, r, prompts[i]) for i, r in enumerate(rows) if row_key(r["row"], i) not in done]
    if not todo:
        return output
    engine = open_engine(
        model, method, options.backend, tokenizer=tokenizer, device=device, dtype=torch_dtype(options.dtype),
        max_batch_size=options.batch_size, max_seq_len=options.max_seq_len, conf_threshold=options.conf_threshold,
        eagle_k=options.eagle_k, **memory_options(options),
    )
    for _, r, ids in todo:
        engine.check_prompt(ids, f"{input}:{r['lineno']}: prompt")
    chunk = max(1, 4 * options.batch_size // options.n)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=f"pipo generate ({method})") as bar:
        for lo in range(0, len(todo), chunk):
            batch = todo[lo : lo + chunk]
            # Row i's samples come from derive_seed(seed, i) alone: a resumed run repeats the uninterrupted one.
            results = engine.generate([ids for _, _, ids in batch], sampling, max_new_tokens=options.max_new_tokens,
                                      n=options.n, stop=list(options.stop), stop_token_ids=list(options.stop_token_ids),
                                      seeds=[derive_seed(options.seed, index) for index, _, _ in batch])
            for written, ((index, r, _), completions) in enumerate(zip(batch, results), start=lo + 1):
                write_row(f, model, method, index, r["row"], completions)
                bar.update(1)
                exit_after_rows_for_test(written)
    return output


def write_row(f, model: Path, method: str, index: int, row: dict, completions) -> None:
    """Append one output row: the input row plus what was generated for it."""
    append_jsonl(f, {
        **row,
        "row": index,
        "method": method,
        "model": str(model),
        "completions": [c.text for c in completions],
        "token_ids": [c.token_ids for c in completions],
        "finish_reasons": [c.finish_reason for c in completions],
        "stats": [c.stats.to_dict() for c in completions],
    })
