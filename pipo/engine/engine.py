"""`Engine`: regular / pipo / mtp / eagle decoding over paged KV memory with continuous batching.

Memory. Every full-attention cache (backbone, MTP layer) lives in one pool of fixed-size
blocks (`blocks.py`); a sequence takes blocks as it grows and returns them when it ends,
so `max_seq_len` is only a per-sequence limit. On CUDA the pool is sized from
`gpu_memory_utilization` after the weights, the per-sequence states and a workspace
reserve (`num_blocks` overrides it). Linear-attention states stay per running sequence.

Scheduling, once per `step()`:
1. admit waiting sequences (first come, first served) while a decode slot, a prefill row and
   the blocks of their prompt are free; a prompt whose prefix is cached shares its blocks;
   the `n` samples of a prompt wait for the first one's prefill and start on its cached state in the
   step that finishes it; while every decode slot is taken and few queued samples have their prompt
   cached, the next waiting prompts are prefilled ahead into free prefill rows and left in the prefix
   cache, several per forward (a prefill forward costs about the same host time for one prompt as for
   eight), so the samples that take freed slots later start without a forward of their own;
2. prefill chunks of admitted prompts in one forward (several prompts, packed end to end without
   padding) under a per-step token budget (`max_prefill_tokens`), in rows of their own, so running
   sequences keep decoding while long prompts come in;
   finished prefills are cached and moved to their decode slots; regular and pipo prefill all but a
   feed's last unit, which the sequence's first decode step runs, sampling its first token(s) with the
   running ones (a separate call would read the LM head again), while mtp and eagle, whose steps take
   several positions, sample first tokens in one batched call;
3. give every decoding sequence the blocks its next step may write; when the pool runs
   out, the most recently admitted sequence is preempted (blocks freed, requeued first,
   later recomputed from its prompt and tokens so far: outputs do not change);
4. queue one decode step for the rows `[0, B)` (a CUDA graph per batch-size bucket), then
   hand out the previous step's tokens (emission runs one step late, overlapping the GPU).

Request API (what an OpenAI-compatible server drives; `generate` is a loop over it):

    engine.add_request(request_id, prompt, sampling, max_new_tokens, n=1, stop=(), stop_token_ids=(), seed=None)
    while engine.has_unfinished():
        for update in engine.step():   # `Update`s: per request sample, the new token ids
            ...                        # since the last step, finished flag, finish_reason, stats
    engine.abort(request_id)           # frees its blocks at once

A sample's seed is `derive_seed(seed, sample index)`; its draws are counter-based, so its
tokens depend only on that seed (not on batch, slot or preemption).
"""
from __future__ import annotations

import heapq
import random
from collections import Counter, deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pipo.engine import prompt_positions
from pipo.engine.blocks import BlockPool, CachedPrompt, PrefixCache
from pipo.engine.decoding import DECODERS, DecodeConfig, PrefillChunk
from pipo.engine.graphs import Launched
from pipo.engine.options import ENGINE_DEFAULTS
from pipo.engine.parts import ModelParts, Prompt, encode_prompt, load_parts, load_tokenizer, parts_from_models
from pipo.engine.parts import eos_token_ids as eos_token_ids_of
from pipo.engine.sequence import Completion, RequestStats, Sequence, StopStrings
from pipo.engine.stack import kv_bytes_per_block
from pipo.errors import PIPOError, ShapeError
from pipo.model.heads import MTPHead
from pipo.model.sampling import SamplingMode, SamplingParams, derive_seed

GiB = 2**30


@dataclass
class Update:
    """What one `Engine.step` produced for one sample of a request."""

    request_id: str
    sample: int
    token_ids: list[int]  # new visible tokens since the last update
    finished: bool
    finish_reason: str | None
    stats: RequestStats
    completion: Completion | None = None  # the whole sample, once finished


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to the maximum batch size, and the maximum itself."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch_size]
    return sizes + [max_batch_size]


def slot_state_bytes(parts: ModelParts, method: str, eagle_k: int, dtype: torch.dtype) -> int:
    """Bytes of one running sequence's fixed-size state: linear-attention conv and fp32 recurrent states
    (per token too where EAGLE records them), presence marks, EAGLE's draft distributions."""
    size = torch.empty((), dtype=dtype).element_size()
    layers = list(parts.base.layers) + (list(parts.mtp.layers) if parts.mtp is not None else [])
    linear = sum(
        layer.linear_attn.conv_dim * (layer.linear_attn.conv_kernel_size - 1) * size
        + 4 * layer.linear_attn.num_v_heads * layer.linear_attn.head_k_dim * layer.linear_attn.head_v_dim
        for layer in layers if hasattr(layer, "linear_attn")
    )
    vocab = parts.text_config.vocab_size
    if method == "eagle":
        return linear * (eagle_k + 2) + vocab * (1 + 4 * eagle_k)
    return linear + vocab


class Engine:
    """One model, one decoding method, paged KV memory shared by up to `max_batch_size` running sequences.

    `model` is a checkpoint folder (PIPO or regular), or a loaded `PIPOForCausalLM` /
    causal LM (then pass `mtp_head` for mtp/eagle and `tokenizer` for text prompts).
    Loaded models are moved to `device`/`dtype` in place. On CUDA, decode steps are
    graph-captured (`cuda_graphs`) and the layers' small ops compiled inside the graphs (`compile_layers`), and
    each layer's projections of one input run as one GEMM (`fuse_projections`: the modules' weights become views
    of one tensor per group, so in-place updates still reach the engine; weights rebound later, by `.to()`,
    `load_state_dict(assign=True)` or a trainer, and modules wrapped later, as PEFT does, are not seen by an
    engine built before: OPD's `RolloutEngine`, which rebinds every parameter, turns it off).
    `max_seq_len` bounds one sequence (prompt + completion); `num_blocks` blocks of
    `block_size` positions hold every sequence's KV (default: on CUDA what
    `gpu_memory_utilization` of the device leaves, on CPU enough for every slot at `max_seq_len`).
    Prompts prefill in chunks of up to `prefill_chunk` positions, up to `prefill_rows` in one forward
    of up to `max_prefill_tokens` positions (packed end to end, no padding), so several prompts share
    a forward: a forward's host cost (~100 ms on an H200, per layer more than per position) is paid
    once for up to 8 prompts, and prefill attention holds no mask, so a larger forward costs only its
    activations.
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
        max_batch_size: int = ENGINE_DEFAULTS.batch_size,
        max_seq_len: int = ENGINE_DEFAULTS.max_seq_len,
        conf_threshold: float = ENGINE_DEFAULTS.conf_threshold,
        eagle_k: int = ENGINE_DEFAULTS.eagle_k,
        prefix_cache_size: int = 8,
        prefill_chunk: int = 2048,
        max_prefill_tokens: int = 8192,
        prefill_rows: int = 8,
        block_size: int = 32,
        num_blocks: int | None = None,
        gpu_memory_utilization: float = ENGINE_DEFAULTS.gpu_memory_utilization,
        cuda_graphs: bool | None = None,
        compile_layers: bool | None = None,
        fuse_projections: bool | None = None,
        eos_token_ids: Seq[int] | None = None,
    ) -> None:
        sizes = (max_batch_size, eagle_k, prefill_chunk, prefill_rows, block_size, max_prefill_tokens)
        if min(sizes) < 1 or max_seq_len < 2:
            raise PIPOError("max_batch_size, eagle_k, prefill_chunk, prefill_rows, block_size and max_prefill_tokens "
                            "must be >= 1 and max_seq_len >= 2")
        if not 0 < gpu_memory_utilization <= 1:
            raise PIPOError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        path = Path(model) if isinstance(model, (str, Path)) else None
        self.parts = load_parts(path, method) if path is not None else parts_from_models(model, method, mtp_head)
        limit = getattr(self.parts.text_config, "max_position_embeddings", None)
        if limit is not None and max_seq_len > limit:
            raise PIPOError(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings {limit}")
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
        self.prefill_chunk, self.prefill_rows = prefill_chunk, prefill_rows
        self.max_prefill_tokens = max_prefill_tokens
        graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        compile_layers = self.device.type == "cuda" if compile_layers is None else compile_layers
        fuse_projections = self.device.type == "cuda" if fuse_projections is None else fuse_projections
        decoder_cls = DECODERS[method]
        config = DecodeConfig(conf_threshold, eagle_k, compile_layers, fuse_projections, block_size, 2)
        probe = decoder_cls.capacity_probe(max_seq_len, config)
        self.blocks_per_seq = -(-probe // block_size)
        rows = max_batch_size + prefill_rows
        self.num_blocks = self._size_pool(num_blocks, rows, gpu_memory_utilization, eagle_k, block_size,
                                          max_batch_size)
        config = DecodeConfig(conf_threshold, eagle_k, compile_layers, fuse_projections, block_size, self.num_blocks)
        self.decoder = decoder_cls(self.parts, rows, max_seq_len, config, graphs)
        self.buckets = batch_buckets(max_batch_size)
        # prefill rows warmed on CUDA only (what it prevents are mid-run Triton compilations and autotuning)
        self._warm_up(graphs, list(range(max_batch_size, rows)) if self.device.type == "cuda" else [])
        self.pool = BlockPool(self.num_blocks)
        self.prefix_cache = PrefixCache(self.pool, prefix_cache_size)
        self.free_slots = list(range(max_batch_size))
        self.free_rows = list(range(max_batch_size, rows))
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: dict[int, Sequence] = {}
        self.requests: dict[str, list[Sequence]] = {}
        self.queued_prompts: Counter = Counter()  # units of fresh samples not admitted yet
        self.in_flight: Launched | None = None
        self.firsts: list[Launched] = []  # first tokens sampled this step, emitted with the step in flight
        self.admitted = 0
        self.mode = SamplingMode()
        # steps, preemptions, running_sum, running_max, prefill_tokens/_forwards/_rows_max, prefills_ahead(_dropped)
        self.metrics = Counter()
        self.touched: list[Sequence] = []  # sequences the current step moved
        self.oom_streak = 0

    @staticmethod
    def blocks_for(method: str, max_seq_len: int, sequences: int, block_size: int = 32,
                   eagle_k: int = ENGINE_DEFAULTS.eagle_k) -> int:
        """The `num_blocks` that holds `sequences` sequences of `max_seq_len` at once (never preempts)."""
        config = DecodeConfig(eagle_k=eagle_k, block_size=block_size)
        return sequences * -(-DECODERS[method].capacity_probe(max_seq_len, config) // block_size) + 1

    @property
    def model_name(self) -> str:
        return self.parts.name

    # ---------------------------------------------------------------- memory
    def _size_pool(self, num_blocks: int | None, rows: int, utilization: float, eagle_k: int, block_size: int,
                   max_batch_size: int) -> int:
        """Blocks in the pool: given, else all slots at `max_seq_len` on CPU, else what the memory budget leaves.

        Fails, before any cache is allocated, when one sequence of `max_seq_len` cannot fit."""
        layers = list(self.parts.base.layers) + (list(self.parts.mtp.layers) if self.parts.mtp is not None else [])
        per_block = kv_bytes_per_block(layers, block_size, self.dtype)
        one_seq = self.blocks_per_seq + 1
        if num_blocks is None and self.device.type != "cuda":
            num_blocks = max_batch_size * self.blocks_per_seq + 1
        if num_blocks is not None:
            if num_blocks < one_seq:
                raise PIPOError(f"num_blocks={num_blocks} cannot hold one sequence of max_seq_len={self.max_seq_len} "
                                f"({self.blocks_per_seq} blocks of {block_size} positions, plus block 0)")
            return num_blocks
        total = torch.cuda.get_device_properties(self.device).total_memory
        weights = torch.cuda.memory_allocated(self.device)
        states = rows * slot_state_bytes(self.parts, self.method, eagle_k, self.dtype)
        reserve = self.workspace_bytes(max_batch_size)
        budget = utilization * total - weights - states - reserve
        if budget < one_seq * per_block:
            raise PIPOError(
                f"one sequence of max_seq_len={self.max_seq_len} does not fit: {utilization:.2f} x "
                f"{total / GiB:.1f} GiB leaves {budget / GiB:.2f} GiB for KV after weights {weights / GiB:.2f} GiB, "
                f"sequence states {states / GiB:.2f} GiB ({rows} rows) and workspace {reserve / GiB:.2f} GiB; one "
                f"sequence needs {one_seq * per_block / GiB:.2f} GiB (lower max_seq_len or max_batch_size, or raise "
                "gpu_memory_utilization)")
        return int(budget // per_block)

    def workspace_bytes(self, max_batch_size: int) -> int:
        """Memory kept out of the KV pool, an estimate: activations of a prefill forward of `max_prefill_tokens`,
        its attention (one sequence's keys and values of one layer gathered at a time, up to `max_seq_len`; the
        output of the whole forward), decode-step logits and sampling buffers, graphs.

        Activations count 4x one layer's live tensors per token (MLP gate, up and product, a few hidden-size
        ones): 2.5 GB at 8192 tokens of a Qwen3.5-4B shape, with fla's chunk states (~0.3 GB) inside. Prefill
        attention takes no mask, so it grows with neither rows x tokens x keys nor `max_seq_len` x tokens.
        """
        cfg = self.parts.text_config
        size = torch.empty((), dtype=self.dtype).element_size()
        chunk, length = max(self.prefill_chunk, self.max_prefill_tokens), self.max_seq_len
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        activations = chunk * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4 * size
        # K and V of a row, gathered from the blocks and made contiguous (2 copies); q, the per-row and whole
        # outputs, and a grouped-query copy of the chunk's own K/V where a kernel makes one
        attention = 2 * 2 * kv_heads * length * head_dim * size + 4 * chunk * heads * head_dim * size
        sampling = max_batch_size * cfg.vocab_size * 4 * 8
        return int(activations + attention + sampling + GiB)

    def _warm_up(self, graphs: bool, prefill_rows: list[int]) -> None:
        """CUDA graphs per bucket (`graphs`), then one prefill forward per prefill row count, before any request;
        an OOM frees what was captured and is reported with the numbers."""
        try:
            if graphs:
                self.decoder.capture(self.buckets)
            self.decoder.warm_prefill(prefill_rows)
        except torch.OutOfMemoryError as error:
            self.decoder = None
            torch.cuda.empty_cache()
            raise PIPOError(
                f"out of GPU memory while capturing CUDA graphs or warming up prefill ({self.num_blocks} KV blocks, "
                f"batch up to {self.max_batch_size}, {len(prefill_rows)} prefill rows): lower gpu_memory_utilization, "
                f"max_batch_size or prefill_rows ({str(error)[:200]})"
            ) from None

    # ---------------------------------------------------------------- prompts
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids as given; text or chat messages through the tokenizer's chat template."""
        return encode_prompt(self.tokenizer, prompt)

    def check_prompt(self, ids: list[int], what: str = "prompt") -> None:
        """Empty prompts and prompts that leave no room in a sequence are errors, named by `what`."""
        if not ids:
            raise ShapeError(f"{what} is empty: nothing to condition on")
        vocab = self.parts.text_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ShapeError(f"{what} holds token ids outside the vocabulary [0, {vocab})")
        if prompt_positions(len(ids), self.method) >= self.max_seq_len:
            raise ShapeError(
                f"{what} has {len(ids)} tokens; a sequence holds max_seq_len={self.max_seq_len} tokens, "
                "prompt and completion together"
            )

    # ---------------------------------------------------------------- request API
    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        sampling: SamplingParams = SamplingParams(),
        max_new_tokens: int = 256,
        n: int = 1,
        stop: Seq[str] = (),
        stop_token_ids: Seq[int] = (),
        seed: int | None = None,
    ) -> None:
        """Queue `n` samples of a prompt; `seed` None draws one at random. Updates come from `step()` (token ids;
        `pipo.serve.stream.TextStream` turns them into text deltas). A `max_new_tokens` past what `max_seq_len`
        leaves after the prompt is cut to it (such a sample ends with finish reason "length")."""
        if n < 1 or max_new_tokens < 1:
            raise PIPOError(f"n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
        if request_id in self.requests:
            raise PIPOError(f"request id {request_id!r} is already running")
        ids = self.encode(prompt)
        self.check_prompt(ids, f"request {request_id!r}: prompt")
        seed = random.getrandbits(63) if seed is None else seed
        units = list(ids)
        if self.method == "pipo" and len(units) % 2:
            units.append(self.parts.pad_token_id)  # the prompt/response boundary falls on a pair boundary
        budget = min(max_new_tokens, self.max_seq_len - len(units))
        stops = frozenset(self.eos_ids) | frozenset(stop_token_ids)
        stop_strings = StopStrings(self.tokenizer, tuple(stop))
        seqs = []
        for j in range(n):
            seqs.append(Sequence(0, j, list(ids), tuple(units), budget, stops, stop_strings, request_id=request_id,
                                 params=sampling, seed=derive_seed(seed, j), feed=tuple(units)))
        self.requests[request_id] = seqs
        self.waiting.extend(seqs)
        self.queued_prompts[seqs[0].units] += n

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.in_flight is not None)

    def abort(self, request_id: str) -> None:
        """Stop a request now: its samples end with finish_reason "abort" and free their blocks and rows."""
        for seq in self.requests.pop(request_id, []):
            if seq.done:
                continue
            seq.finish_reason, seq.closed = "abort", True
            if seq in self.waiting:
                self.waiting.remove(seq)
                if seq.slot < 0 and not seq.raw:
                    self._unqueue(seq.units)
                    entry = self.prefix_cache.entries.get(seq.units)
                    if entry is not None and entry.waiting > 0:  # it no longer waits for the cached prompt
                        entry.waiting -= 1
            self._release(seq)

    def step(self) -> list[Update]:
        """One scheduler iteration (module docstring); returns the updates of the samples that moved."""
        self.touched = []
        try:
            self._admit()
            self._prefill_ahead()
            self.touched += self._prefill()
            launched = None
            if self.running:
                self._reserve_decode_blocks()
            if self.running:
                self._set_mode()
                batch = next(b for b in self.buckets if b > max(self.running))
                launched = self.decoder.step(batch, self.running)
                self.metrics["steps"] += 1
                self.metrics["running_sum"] += len(self.running)
                self.metrics["running_max"] = max(self.metrics["running_max"], len(self.running))
        except torch.OutOfMemoryError as error:
            self._recover_from_oom(error)
            return self._updates(self.touched)
        self.oom_streak = 0
        self._drain()
        self.in_flight = launched
        return self._updates(self.touched)

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
        `token_ids`); a stop string ends it and is cut from the text. Prompt i's seed is `seeds[i]`, by
        default `derive_seed(seed, i)` (pass `seeds` to resume a run from its row indices)."""
        if n < 1 or max_new_tokens < 1:
            raise PIPOError(f"n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
        encoded = [self.encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            self.check_prompt(ids, f"prompt {i}")
        if seeds is not None and len(seeds) != len(encoded):
            raise PIPOError(f"seeds has {len(seeds)} entries for {len(encoded)} prompts")
        seeds = list(seeds) if seeds is not None else [derive_seed(seed, i) for i in range(len(encoded))]
        base = f"generate-{id(encoded)}-"
        for i, ids in enumerate(encoded):
            self.add_request(base + str(i), ids, sampling, max_new_tokens, n, stop, stop_token_ids, seeds[i])
        results: list[list[Completion | None]] = [[None] * n for _ in encoded]
        with tqdm(total=len(encoded) * n, disable=not progress, desc=f"generate ({self.method})") as bar:
            while self.has_unfinished():
                for update in self.step():
                    if update.finished and update.request_id.startswith(base):
                        results[int(update.request_id[len(base):])][update.sample] = update.completion
                        bar.update(1)
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------------- scheduling
    def _admit(self, only: set[tuple[int, ...]] | None = None) -> None:
        """Admit waiting sequences in order while rows and blocks allow; samples of a prompt being prefilled
        wait for it (they will share its blocks), samples of a cached prompt start together. `only`: stop at
        the first waiting sequence that is not a fresh sample of one of these prompts."""
        busy = {s.feed for s in self.prefilling if not s.raw and self._unprefilled(s)}
        skipped = []
        while self.waiting and self.free_slots and self.free_rows:
            seq = self.waiting.popleft()
            if only is not None and (seq.raw or seq.feed not in only):
                self.waiting.appendleft(seq)
                break
            if not seq.raw and seq.feed in busy:
                skipped.append(seq)
                continue
            if not self._start(seq):
                self.waiting.appendleft(seq)
                break
            if not seq.raw and self._unprefilled(seq):
                busy.add(seq.feed)
        self.waiting.extendleft(reversed(skipped))

    def _unprefilled(self, seq: Sequence) -> int:
        """Positions of an admitted sequence's feed that still need a prefill forward (0: the cache served it)."""
        return self.decoder.prefill_length(len(seq.feed) // self.decoder.unit_width) - seq.prefilled

    def _unqueue(self, units: tuple[int, ...]) -> None:
        """One fresh sample of `units` fewer waits; the key leaves with the last one (a server sees every
        prompt once: zero counts would keep each prompt's tokens for the process's life)."""
        self.queued_prompts[units] -= 1
        if self.queued_prompts[units] <= 0:
            del self.queued_prompts[units]

    def _start(self, seq: Sequence) -> bool:
        """Take a decode slot (none for a prefill ahead), a prefill row and the blocks of the sequence's feed
        (sharing a cached prefix) and of what its first-token call writes past it (EAGLE's first drafts).
        A prefill ahead evicts nothing and leaves blocks free for the running sequences."""
        w, bs = self.decoder.unit_width, self.decoder.block_size
        total = len(seq.feed) // w
        hit = self.prefix_cache.lookup(seq.feed, w, bs)
        shared = hit.blocks[: self._full_blocks(hit.length)] if hit is not None else []
        tail = hit is not None and len(hit.blocks) > len(shared)
        need = -(-min(total + self.decoder.first_room, self.decoder.capacity) // bs) - len(shared)
        if hit is not None:
            self.pool.share(hit.blocks)  # pin the entry's blocks while eviction runs
        # a prefill ahead leaves what the running sequences may soon ask for: a block each, and an eighth of the pool
        headroom = max(len(self.running), self.pool.capacity // 8) if seq.ahead else 0
        if not seq.ahead and self.pool.available < need:
            self.prefix_cache.evict(need)
        if self.pool.available < need + headroom:
            if hit is not None:
                self.pool.release(hit.blocks)
            return False
        fresh = self.pool.take(need)
        self.prefix_cache.count(seq.feed, hit, w, bs)
        seq.row = heapq.heappop(self.free_rows)
        seq.order = self.admitted = self.admitted + 1
        if seq.ahead:
            self.metrics["prefills_ahead"] += 1
        else:
            seq.slot = heapq.heappop(self.free_slots)
            seq.start()
        if not seq.raw and not seq.ahead:
            self._unqueue(seq.units)
        self.decoder.reset(seq.row, seq.tokens)
        self.decoder.set_row(seq.row, seq.params, seq.seed)
        if self.decoder.decodes_last_unit and not seq.ahead:
            self.decoder.hold(seq.row, seq.feed[-w:])
        seq.blocks = shared + fresh
        if hit is not None:
            if tail:
                self.decoder.copy_block(hit.blocks[-1], fresh[0])  # copy-on-write of the partial block
            self.decoder.load_state(seq.row, hit.state, hit.length)
            self.pool.release([b for b in hit.blocks if b not in shared])
            if hit.units == seq.feed and not seq.raw and not seq.ahead:
                hit.waiting -= 1
        seq.prefilled = hit.length if hit is not None else 0
        self._write_table(seq.row, 0, seq.blocks)
        self.prefilling.append(seq)
        return True

    def _full_blocks(self, length: int) -> int:
        """Blocks every cache has filled once `length` positions are prefilled (shareable, never written again)."""
        return self.decoder.mtp_entries(length) // self.decoder.block_size

    def _prefill(self) -> list[Sequence]:
        """One prefill forward over chunks of admitted prompts, first come first, under the per-step token budget
        (the chunks are packed: real positions count); start the prompts it finishes (or the cache served whole) and
        the samples that waited for them, and sample all their first tokens in one call (unless their first decode
        step does: `decodes_last_unit`)."""
        chunks: list[tuple[Sequence, int]] = []
        tokens = rows = 0
        for seq in self.prefilling:
            left = self._unprefilled(seq)
            take = min(left, self.prefill_chunk, self.max_prefill_tokens - tokens)
            if left and take < 1:
                break
            chunks.append((seq, take))
            rows, tokens = rows + (take > 0), tokens + take
        if tokens:
            self.decoder.prefill([PrefillChunk(s.row, s.feed, s.prefilled, s.prefilled + take)
                                  for s, take in chunks if take])
            self.metrics["prefill_forwards"] += 1
            self.metrics["prefill_rows_max"] = max(self.metrics["prefill_rows_max"], rows)
        started, prompts = [], set()  # prompts: fresh ones this forward finished (now cached)
        for seq, take in chunks:
            seq.prefilled += take
            self.metrics["prefill_tokens"] += take
            if self._unprefilled(seq):
                continue
            if take and not seq.raw:
                prompts.add(seq.feed)
            if seq.ahead:
                self._park(seq)
                continue
            self._to_decode(seq, prefilled=take > 0)
            started.append(seq)
        if prompts:  # the samples that waited for these prompts start on their cached state now, not a step later
            self._admit(only=prompts)
            for seq in [s for s in self.prefilling if not s.ahead and not self._unprefilled(s)]:
                self._to_decode(seq, prefilled=False)
                started.append(seq)
        if started and not self.decoder.decodes_last_unit:  # their first token(s), in one batched call
            self._set_mode()
            launched = self.decoder.first({s.slot: s for s in sorted(started, key=lambda s: s.slot)})
            if launched is not None:
                self.firsts.append(launched)
        return started

    def _prefill_ahead(self) -> None:
        """While every decode slot is taken and fewer than `prefill_rows` queued samples have their prompt cached
        (or being prefilled ahead), start prefill jobs for the next waiting prompts in the free prefill rows:
        `_prefill` runs them together in one forward and `_park` leaves each prompt in the prefix cache. The queue
        is taken in order up to the first prompt whose prefill is longer than one chunk (that one is prefilled
        when its sample gets a slot), so a step never scans more than a few entries of a long queue; a prompt
        with nothing to prefill (one unit, for regular and pipo) is passed over."""
        if self.free_slots or not self.free_rows:
            return
        ahead = {s.feed for s in self.prefilling if s.ahead}
        ready = sum(self.queued_prompts[units] for units in {*self.prefix_cache.entries, *ahead})
        if ready >= self.prefill_rows:
            return
        busy = {s.feed for s in self.prefilling}
        width = self.decoder.unit_width
        for seq in self.waiting:
            if not self.free_rows:
                break
            length = self.decoder.prefill_length(len(seq.feed) // width)
            if length > self.prefill_chunk:
                break
            if not length or seq.raw or seq.feed in busy or seq.feed in self.prefix_cache.entries:
                continue
            job = seq.prefill_job()
            if not self._start(job):
                break
            busy.add(job.feed)

    def _park(self, job: Sequence) -> None:
        """A finished prefill ahead: its prompt goes into the prefix cache; its row and blocks are freed."""
        self.prefilling.remove(job)
        self._cache_prompt(job, ending=True)
        self.decoder.tables[job.row].zero_()
        heapq.heappush(self.free_rows, job.row)
        self.pool.release(job.blocks)
        job.blocks, job.row = [], -1

    def _cache_prompt(self, seq: Sequence, ending: bool = False) -> None:
        """Keep a prefilled prompt's state: its full blocks shared, its partial block copied (needs one block,
        which may evict), or shared too where `seq` ends here (a prefill ahead: nothing writes it after)."""
        if self.prefix_cache.capacity <= 0 and self.queued_prompts[seq.units] <= 0:
            return
        length = seq.prefilled
        full, used = self._full_blocks(length), -(-length // self.decoder.block_size)
        blocks, copy = seq.blocks[: used if ending else full], []
        if used > len(blocks):  # the partial block, copied: the sequence goes on writing its own
            if self.pool.available < 1:
                self.prefix_cache.evict(1)
            if self.pool.available < 1:
                return
            copy = self.pool.take(1)
            self.decoder.copy_block(seq.blocks[full], copy[0])
        self.pool.share(blocks)
        self.prefix_cache.store(CachedPrompt(seq.feed, blocks + copy, length, self.decoder.save_state(seq.row),
                                             waiting=self.queued_prompts[seq.units]))

    def _to_decode(self, seq: Sequence, prefilled: bool) -> None:
        """Cache a prompt it prefilled (`prefilled`: a forward finished it; else the cache served it whole) and move
        the sequence from its prefill row to its decode slot (its first step, or `_prefill`'s first-token call,
        samples its first token(s)). The pass that gives a fresh sample its first token counts once whoever ran
        the prompt's prefill (as in the reference generators); a resumed sequence's prefill counts one more (for
        regular and pipo that count is its first step's)."""
        self.prefilling.remove(seq)
        seq.stats.forward_passes += int((prefilled or not seq.raw) and not self.decoder.decodes_last_unit)
        if prefilled and not seq.raw:
            self._cache_prompt(seq)
        row, seq.row = seq.row, seq.slot
        self.decoder.move(row, seq.slot)
        self.decoder.tables[row].zero_()
        heapq.heappush(self.free_rows, row)
        seq.length = seq.prefilled
        self.running[seq.slot] = seq

    def _reserve_decode_blocks(self) -> None:
        """Blocks for every position the next step may write; evict cached prompts, then preempt the newest."""
        bs, reach = self.decoder.block_size, self.decoder.reach
        while True:
            wants = []
            for seq in self.running.values():
                need = -(-min(seq.length + reach, self.decoder.capacity) // bs) - len(seq.blocks)
                if need > 0 and not seq.done:
                    wants.append((seq, need))
            total = sum(n for _, n in wants)
            if total > self.pool.available:
                self.prefix_cache.evict(total)
            if total <= self.pool.available:
                break
            if self.in_flight is not None or self.firsts:  # exact lengths first: emission may finish sequences
                self._drain()
                continue
            finished = [s for s in self.running.values() if s.done]
            if finished:  # their blocks go back now (`_updates` completes them); a finished one is never requeued
                for seq in finished:
                    self._release(seq)
                self.touched += finished
                continue
            # a prefill ahead first, else the most recently admitted sequence
            self._preempt(max([*self.running.values(), *self.prefilling], key=lambda s: (s.ahead, s.order)))
        for seq, need in wants:
            fresh = self.pool.take(need)
            self._write_table(seq.slot, len(seq.blocks), fresh)
            seq.blocks += fresh

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks and rows and queue it first; it will prefill its prompt + tokens again.
        A prefill ahead is dropped instead (its prompt is prefilled when a sample of it starts)."""
        self._release(seq)
        if seq.ahead:
            self.metrics["prefills_ahead_dropped"] += 1
            return
        seq.feed = seq.resume_feed(self.decoder.resumes_from_last_token)
        seq.prefilled = 0
        if not seq.raw:
            self.queued_prompts[seq.units] += 1
        self.waiting.appendleft(seq)
        self.metrics["preemptions"] += 1

    def _release(self, seq: Sequence) -> None:
        """Return a sequence's blocks, rows and slot (its table rows point at block 0 again)."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
            self.decoder.tables[seq.row].zero_()
            heapq.heappush(self.free_rows, seq.row)
            if seq.slot >= 0:
                heapq.heappush(self.free_slots, seq.slot)
        elif self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self.decoder.tables[seq.slot].zero_()
            heapq.heappush(self.free_slots, seq.slot)
            self._set_mode()
        self.pool.release(seq.blocks)
        seq.blocks, seq.slot, seq.row = [], -1, -1

    def _write_table(self, row: int, start: int, blocks: list[int]) -> None:
        if blocks:
            self.decoder.tables[row, start : start + len(blocks)] = self.decoder.to_device(blocks)

    def _set_mode(self) -> None:
        mode = SamplingMode.of([s.params for s in self.running.values()]) if self.running else self.mode
        if mode != self.mode:
            self.mode = mode
            self.decoder.set_mode(mode)

    def _drain(self) -> None:
        """Emit the first tokens sampled this step, then the step in flight (queued earlier than them, so
        none of its values are theirs); their sequences join this step's updates."""
        launches = self.firsts + ([self.in_flight] if self.in_flight is not None else [])
        self.firsts, self.in_flight = [], None
        for launched in launches:
            launched.finish()
            self.touched += list(launched.seqs.values())

    def _updates(self, touched: Iterable[Sequence]) -> list[Update]:
        """New tokens and text of the touched samples; finished ones are released and completed."""
        updates, seen = [], set()
        for seq in touched:
            if id(seq) in seen or seq.closed or seq.slot < 0 and not seq.done:
                continue
            seen.add(id(seq))
            if not seq.done and seq.length + self.decoder.room > self.decoder.capacity:
                seq.finish_reason = "length"
            if len(seq.tokens) == seq.reported and not seq.done:
                continue
            new = seq.tokens[seq.reported :]
            seq.reported = len(seq.tokens)
            completion = None
            if seq.done:
                if seq.slot >= 0:
                    self._release(seq)
                completion = seq.completion(self.tokenizer)
                seq.closed = True
                self._forget(seq)
            updates.append(Update(seq.request_id, seq.sample, new, seq.done, seq.finish_reason, seq.stats,
                                  completion))
        return updates

    def _forget(self, seq: Sequence) -> None:
        seqs = self.requests.get(seq.request_id)
        if seqs is not None and all(s.done for s in seqs):
            del self.requests[seq.request_id]

    def _recover_from_oom(self, error: torch.OutOfMemoryError) -> None:
        """Free what the failed step held: the step in flight is dropped and every admitted sequence is
        preempted (each recomputes from its emitted tokens); a second OOM in a row stops every request
        with a clear error, leaving the engine empty and usable."""
        self.in_flight, self.firsts = None, []
        for seq in sorted([*self.running.values(), *self.prefilling], key=lambda s: -s.order):
            if seq.done:  # completed by `_updates`, never requeued
                self._release(seq)
                self.touched.append(seq)
            else:
                self._preempt(seq)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.oom_streak += 1
        if self.oom_streak < 2:
            return
        for seq in list(self.waiting):
            self.abort(seq.request_id)
        self.waiting.clear()
        self.queued_prompts.clear()
        self.prefix_cache.clear()
        raise PIPOError(f"out of device memory twice in a row ({str(error)[:200]}): lower "
                        "gpu_memory_utilization, prefill_chunk or max_seq_len")


def open_engine(model: str | Path | PreTrainedModel, method: str = "regular", backend: str = "native", **options):
    """`Engine`, or with `backend="sglang"` the thin SGLang wrapper (regular and eagle only)."""
    if backend == "native":
        return Engine(model, method, **options)
    if backend == "sglang":
        from pipo.engine.sglang_backend import SGLangEngine

        return SGLangEngine(model, method, **options)
    raise PIPOError(f"backend must be 'native' or 'sglang', got {backend!r}")
