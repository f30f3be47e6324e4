"""Optional SGLang backend for the `regular` and `eagle` baselines (`backend="sglang"`), behind the same `generate` API.

Thin by design: SGLang schedules and samples; this only maps parameters and results.
Qwen3.5's native MTP head is SGLang's NEXTN speculative algorithm.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

from pipo.engine.options import ENGINE_DEFAULTS
from pipo.engine.parts import Prompt, encode_prompt, load_tokenizer
from pipo.engine.sequence import Completion, RequestStats
from pipo.errors import PIPOError
from pipo.model.sampling import SamplingParams, derive_seed


class SGLangEngine:
    """`sglang.Engine` for a regular checkpoint folder; `generate` mirrors `pipo.engine.Engine.generate`."""

    def __init__(self, model: str | Path, method: str = "regular", *, max_batch_size: int = ENGINE_DEFAULTS.batch_size,
                 max_seq_len: int = ENGINE_DEFAULTS.max_seq_len, eagle_k: int = ENGINE_DEFAULTS.eagle_k,
                 dtype: str = ENGINE_DEFAULTS.dtype, **_unused) -> None:
        if method not in ("regular", "eagle"):
            raise PIPOError(f"the sglang backend serves the regular and eagle methods, not {method!r}")
        try:
            import sglang
        except ImportError as err:
            raise PIPOError("backend 'sglang' needs SGLang: pip install 'pipo[sglang]' (or use the native backend)") from err
        options = dict(model_path=str(model), context_length=max_seq_len, max_running_requests=max_batch_size,
                       dtype=dtype, random_seed=0)
        if method == "eagle":
            options.update(speculative_algorithm="NEXTN", speculative_num_steps=eagle_k, speculative_eagle_topk=1,
                           speculative_num_draft_tokens=eagle_k + 1)
        self.method, self.model_name = method, str(model)
        self.tokenizer = load_tokenizer(model)
        self.engine = sglang.Engine(**options)

    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def check_prompt(self, ids: list[int], what: str = "prompt") -> None:
        if not ids:
            raise PIPOError(f"{what} is empty: nothing to condition on")

    def generate(self, prompts: Seq[Prompt], sampling: SamplingParams = SamplingParams(), *, max_new_tokens: int = 256,
                 n: int = 1, stop: Seq[str] = (), stop_token_ids: Seq[int] = (), seed: int = 0,
                 seeds: Seq[int] | None = None, progress: bool = False) -> list[list[Completion]]:
        ids = [self.encode(p) for p in prompts]
        params = dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1,
                      min_p=sampling.min_p, presence_penalty=sampling.presence_penalty,
                      max_new_tokens=max_new_tokens, stop=list(stop), stop_token_ids=list(stop_token_ids))
        prompt_seeds = list(seeds) if seeds is not None else [derive_seed(seed, i) for i in range(len(ids))]
        per_request = [{**params, "sampling_seed": derive_seed(s, j)} for s in prompt_seeds for j in range(n)]
        outs = self.engine.generate(input_ids=[x for x in ids for _ in range(n)], sampling_params=per_request)
        results = []
        for i, prompt_ids in enumerate(ids):
            row = []
            for out in outs[i * n : (i + 1) * n]:
                meta = out.get("meta_info", {})
                tokens = list(out.get("output_ids", []))
                reason = (meta.get("finish_reason") or {}).get("type", "length")
                stats = RequestStats(prompt_tokens=len(prompt_ids), emitted_tokens=len(tokens),
                                     forward_passes=int(meta.get("spec_verify_ct", len(tokens))),
                                     latency_s=float(meta.get("e2e_latency", 0.0)))
                row.append(Completion(tokens, out.get("text", ""), "eos" if reason == "stop" else reason, stats, tokens))
            results.append(row)
        return results
