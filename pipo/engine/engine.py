"""`Engine`: batched generation with regular / pipo / mtp / eagle decoding, continuous batching by slot.

Every request sample gets a slot; when one finishes, its slot takes the next waiting
one. Each decode step runs one backbone pass for the active slots `[0, B)`, B rounded
up to a batch-size bucket (one CUDA graph per bucket on GPU). The prompt state after
prefill is kept in a small prefix cache, so the `n` samples of a prompt (and prompts
that extend a cached one, at pair granularity for pipo) skip the shared prefill.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pipo.engine.decoding import DECODERS, DecodeConfig
from pipo.engine.parts import Prompt, encode_prompt, load_parts, load_tokenizer, parts_from_models
from pipo.engine.parts import eos_token_ids as eos_token_ids_of
from pipo.engine.sequence import Completion, Sequence, StopStrings
from pipo.errors import PIPOError, ShapeError
from pipo.model.heads import MTPHead
from pipo.model.sampling import SamplingParams

class PrefixCache:
    """LRU map from a prompt's backbone units to its post-prefill slot state; lookups find the longest cached prefix."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[tuple[int, ...], dict] = OrderedDict()

    def lookup(self, units: tuple[int, ...], width: int) -> tuple[tuple[int, ...], dict] | None:
        best = None
        for key in self.entries:
            if len(key) <= len(units) and units[: len(key)] == key and (best is None or len(key) > len(best)):
                best = key
        if best is None or len(best) % width:
            return None
        self.entries.move_to_end(best)
        return best, self.entries[best]

    def store(self, units: tuple[int, ...], state: dict) -> None:
        if self.capacity <= 0:
            return
        self.entries[units] = state
        self.entries.move_to_end(units)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to the maximum batch size, and the maximum itself."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch_size]
    return sizes + [max_batch_size]


class Engine:
    """One model, one decoding method, static caches for `max_batch_size` slots of `max_seq_len` tokens.

    `model` is a checkpoint folder (PIPO or regular), or a loaded `PIPOForCausalLM` /
    causal LM (then pass `mtp_head` for mtp/eagle and `tokenizer` for text prompts).
    Loaded models are moved to `device`/`dtype` in place. On CUDA, decode steps are
    graph-captured (`cuda_graphs`) and the layers' small ops compiled (`compile_layers`).
    """

    def __init__(
        self,
        model: str | Path | PreTrainedModel,
        method: str = "regular",
        *,
        tokenizer=None,
        mtp_head: MTPHead | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_batch_size: int = 8,
        max_seq_len: int = 4096,
        conf_threshold: float = 0.5,
        eagle_k: int = 3,
        prefix_cache_size: int = 8,
        prefill_chunk: int = 2048,
        cuda_graphs: bool | None = None,
        compile_layers: bool | None = None,
        eos_token_ids: Seq[int] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_seq_len < 2 or eagle_k < 1 or prefill_chunk < 1:
            raise PIPOError("max_batch_size, eagle_k and prefill_chunk must be >= 1 and max_seq_len >= 2")
        path = Path(model) if isinstance(model, (str, Path)) else None
        self.parts = load_parts(path, method) if path is not None else parts_from_models(model, method, mtp_head)
        self.method = method
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        for module in (self.parts.base, self.parts.lm_head, self.parts.mtp, self.parts.compressor,
                       self.parts.confidence_head):
            if module is not None:
                module.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer if tokenizer is not None or path is None else load_tokenizer(path)
        self.eos_ids = (
            list(eos_token_ids) if eos_token_ids is not None
            else eos_token_ids_of(path, self.parts.text_config, self.tokenizer)
        )
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        compile_layers = self.device.type == "cuda" if compile_layers is None else compile_layers
        config = DecodeConfig(conf_threshold, eagle_k, prefill_chunk, compile_layers)
        self.decoder = DECODERS[method](self.parts, max_batch_size, max_seq_len, config, graphs)
        self.buckets = batch_buckets(max_batch_size)
        if graphs:
            self.decoder.capture(self.buckets)
        self.prefix_cache = PrefixCache(prefix_cache_size)

    @property
    def model_name(self) -> str:
        return self.parts.name

    # ---------------------------------------------------------------- prompts
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids as given; text or chat messages through the tokenizer's chat template."""
        return encode_prompt(self.tokenizer, prompt)

    def check_prompt(self, ids: list[int], what: str = "prompt") -> None:
        """Empty prompts and prompts that leave no room in the cache are errors, named by `what`."""
        if not ids:
            raise ShapeError(f"{what} is empty: nothing to condition on")
        vocab = self.parts.text_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ShapeError(f"{what} holds token ids outside the vocabulary [0, {vocab})")
        if len(ids) + len(ids) % 2 >= self.max_seq_len:
            raise ShapeError(
                f"{what} has {len(ids)} tokens; the cache holds max_seq_len={self.max_seq_len} tokens per "
                "sequence, prompt and completion together"
            )

    # ---------------------------------------------------------------- generation
    def generate(
        self,
        prompts: Seq[Prompt],
        sampling: SamplingParams = SamplingParams(),
        *,
        max_new_tokens: int = 256,
        n: int = 1,
        stop: Seq[str] = (),
        stop_token_ids: Seq[int] = (),
        seed: int = 0,
        seeds: Seq[int] | None = None,
        progress: bool = False,
    ) -> list[list[Completion]]:
        """`n` completions per prompt (in prompt order). EOS ids and `stop_token_ids` end a sample (kept in
        `token_ids`); a stop string ends it and is cut from the text. With `seeds`, prompt i's samples
        depend on `seeds[i]` alone (pass row-derived seeds to resume a run): one prompt per pass, since
        the decoder's generator is shared by the rows of a batch."""
        if n < 1 or max_new_tokens < 1:
            raise PIPOError(f"n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
        if seeds is not None:
            if len(seeds) != len(prompts):
                raise PIPOError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
            return [self.generate([p], sampling, max_new_tokens=max_new_tokens, n=n, stop=stop,
                                  stop_token_ids=stop_token_ids, seed=s)[0] for p, s in zip(prompts, seeds)]
        encoded = [self.encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            self.check_prompt(ids, f"prompt {i}")
        banned = [self.parts.pad_token_id] if self.method == "pipo" else []
        self.decoder.configure(sampling, seed, banned)
        stops = frozenset(self.eos_ids) | frozenset(stop_token_ids)
        stop_strings = StopStrings(self.tokenizer, tuple(stop))
        waiting = deque(self._sequence(i, j, ids, max_new_tokens, stops, stop_strings)
                        for i, ids in enumerate(encoded) for j in range(n))
        results: list[list[Completion | None]] = [[None] * n for _ in encoded]
        free = list(range(self.max_batch_size))
        active: dict[int, Sequence] = {}
        in_flight = None  # the last launched step, emitted after the next one is queued
        with tqdm(total=len(waiting), disable=not progress, desc=f"generate ({self.method})") as bar:
            while waiting or active or in_flight is not None:
                for _ in range(2):  # finished sequences free their slots; a first token can finish one too
                    for slot, seq in list(active.items()):
                        if not seq.done and seq.length + self.decoder.room > self.decoder.capacity:
                            seq.finish_reason = "length"
                        if seq.done:
                            results[seq.index][seq.sample] = seq.completion(self.tokenizer)
                            del active[slot]
                            heapq.heappush(free, slot)
                            bar.update(1)
                    admitted = False
                    while waiting and free:
                        slot = heapq.heappop(free)
                        active[slot] = waiting.popleft()
                        self._start(slot, active[slot])
                        admitted = True
                    if not admitted:
                        break
                # Queue step t+1 before emitting step t, so the host's emission overlaps the GPU. A sequence
                # that step t finishes still had step t+1 computed: `finish` drops its values, and the next
                # request that takes the slot resets it.
                launched = None
                if active:
                    batch = next(b for b in self.buckets if b > max(active))
                    launched = self.decoder.step(batch, active)
                if in_flight is not None:
                    in_flight.finish()
                in_flight = launched
        return results  # type: ignore[return-value]

    def _sequence(self, index, sample, ids, max_new_tokens, stops, stop_strings) -> Sequence:
        units = list(ids)
        if self.method == "pipo" and len(units) % 2:
            units.append(self.parts.pad_token_id)  # the prompt/response boundary falls on a pair boundary
        budget = min(max_new_tokens, self.max_seq_len - len(units))
        return Sequence(index, sample, list(ids), tuple(units), budget, stops, stop_strings)

    def _start(self, slot: int, seq: Sequence) -> None:
        """Prefill a slot (reusing the longest cached prompt prefix) and sample its first token(s)."""
        seq.start()
        width = self.decoder.unit_width
        hit = self.prefix_cache.lookup(seq.units, width)
        if hit is None:
            self.decoder.reset(slot)
            start = 0
        else:
            start = self.decoder.restore(slot, hit[1])
        self.decoder.prefill(slot, seq, start)
        if hit is None or len(hit[0]) < len(seq.units):
            self.prefix_cache.store(seq.units, self.decoder.snapshot(slot, seq.length))
        self.decoder.first(slot, seq)


def open_engine(model: str | Path | PreTrainedModel, method: str = "regular", backend: str = "native", **options):
    """`Engine`, or with `backend="sglang"` the thin SGLang wrapper (regular and eagle only)."""
    if backend == "native":
        return Engine(model, method, **options)
    if backend == "sglang":
        from pipo.engine.sglang_backend import SGLangEngine

        return SGLangEngine(model, method, **options)
    raise PIPOError(f"backend must be 'native' or 'sglang', got {backend!r}")
