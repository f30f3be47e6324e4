"""The four decoding methods as batched steps over paged KV caches (docs/method.md section 6).

A decoder owns the KV block pools, the block tables and the per-slot state of every
running sequence (linear-attention states, last hidden, presence marks, sampling
parameters and seed). `prefill` runs prompt positions `[lo, hi)` of several rows in one
forward, packed end to end (and the MTP head's cache over the prompts' gold tokens); `step`
advances every active slot in rows `[0, B)` by one backbone pass. Regular and pipo prefill all but
a feed's last unit and let the sequence's first step run it and sample its first token(s)
(`decodes_last_unit`); mtp and eagle, whose steps take several positions, sample the first tokens of
the slots prefilled in a step in one batched call (`first`). Model calls of a decode step
go through `graphs.GraphedFn`, which replays CUDA graphs captured per batch-size bucket on GPU
and runs eagerly elsewhere; `graphs.launch` starts the copy of a step's values to the host.
Speculative acceptance (EAGLE) lives with the sampling code in `pipo.model.sampling`.

Sampling is per row: each slot carries its own `SamplingParams` as tensors and its own
seed, and every draw is counter-based noise of (seed, the row's cache length, a salt per
draw of the step), so a sequence's tokens do not depend on its batch, slot or preemption.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pipo.engine import kernels
from pipo.engine.graphs import GraphedFn, Launched, capturing, launch
from pipo.engine.options import ENGINE_DEFAULTS
from pipo.engine.parts import ModelParts
from pipo.engine.sequence import Sequence
from pipo.engine.stack import PagedStack, Spans
from pipo.model.sampling import (
    RowNoise,
    RowParams,
    SamplingMode,
    SamplingParams,
    row_probabilities,
    sample_probs,
    sample_rows,
    seed32,
    speculative_accept,
)


class PrefillChunk(NamedTuple):
    """Positions `lo..hi-1` of a prompt (`units`: its token ids, pairs for PIPO) to prefill in prefill row `row`."""

    row: int
    units: tuple[int, ...]
    lo: int
    hi: int


@dataclass(frozen=True)
class DecodeConfig:
    conf_threshold: float = ENGINE_DEFAULTS.conf_threshold  # pipo: keep token2 when sigmoid(confidence) >= this
    eagle_k: int = ENGINE_DEFAULTS.eagle_k  # eagle: tokens drafted per step
    compile_layers: bool = False  # torch.compile the layers' pure segments (GPU: fuses the small kernels)
    fuse_projections: bool = False  # one GEMM per layer's projections of one input (their weights become views)
    block_size: int = 32  # positions per KV block
    num_blocks: int = 0  # KV blocks in the pool (block 0 included)


class Decoder:
    """Caches and shared machinery; subclasses define the method's `first` and `step`.

    `step` only queues device work (model graph, then the sampling graph, which also marks
    presence and writes the next inputs) and returns a `Launched`; its `finish` emits.
    """

    unit_width = 1  # tokens per backbone position
    uses_mtp = False
    # a step takes one unit per row: a sequence's first step runs its feed's last unit (prefill stops one short) and
    # samples its first token(s), so no call of its own reads the LM head for them; `first` serves the others
    decodes_last_unit = False
    record_steps = 0
    resumes_from_last_token = False  # a preempted sequence prefills all it emitted and samples anew

    def __init__(self, parts: ModelParts, slots: int, max_seq_len: int, config: DecodeConfig, graphs: bool) -> None:
        self.parts = parts
        self.config = config
        self.slots = slots
        self.graphs_enabled = graphs
        base = parts.base
        param = next(base.parameters())
        self.device = param.device
        self.capacity = self.capacity_probe(max_seq_len, config)
        self.block_size = config.block_size
        self.max_blocks = -(-self.capacity // self.block_size)
        self.tables = torch.zeros(slots, self.max_blocks, dtype=torch.long, device=self.device)
        self.backbone = PagedStack(base.layers, base.norm, base.rotary_emb, slots, self.tables, config.num_blocks,
                                   self.block_size, self.record_steps, config.compile_layers, config.fuse_projections)
        self.mtp = (
            PagedStack(parts.mtp.layers, parts.mtp.norm, base.rotary_emb, slots, self.tables, config.num_blocks,
                       self.block_size, compile=config.compile_layers, fuse=config.fuse_projections)
            if self.uses_mtp else None
        )
        vocab, hidden = parts.text_config.vocab_size, parts.text_config.hidden_size
        self.vocab = vocab
        self.lengths = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.h_last = torch.zeros(slots, hidden, dtype=param.dtype, device=self.device)
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=self.device)
        self.pending = torch.zeros(slots, max(self.room, self.unit_width), dtype=torch.long, device=self.device)
        floats = [torch.zeros(slots, device=self.device) for _ in range(3)]
        self.row = RowParams(floats[0], torch.ones(slots, device=self.device),
                             torch.zeros(slots, dtype=torch.long, device=self.device), floats[1], floats[2])
        self.seeds = torch.zeros(slots, dtype=torch.long, device=self.device)
        pool = torch.cuda.graph_pool_handle() if graphs else None
        self.backbone_step = GraphedFn(self._backbone_step, pool)
        self.mtp_step = GraphedFn(self._mtp_step, pool)
        banned = [parts.pad_token_id] if self.unit_width == 2 else []
        self.banned = torch.tensor(banned, dtype=torch.long, device=self.device) if banned else None
        self.mode = SamplingMode()
        self.buckets: list[int] = []
        self.samplers: dict[SamplingMode, dict[str, GraphedFn]] = {}
        self.sampler: dict[str, GraphedFn] = {}
        self.set_mode(self.mode)

    # ---------------------------------------------------------------- sizing
    @classmethod
    def room_for(cls, config: DecodeConfig) -> int:
        """Cache entries one decode step may write past a row's length."""
        return 1

    @property
    def room(self) -> int:
        return self.room_for(self.config)

    @property
    def reach(self) -> int:
        """Cache entries past a row's length as the host counts it that the next step may write: the step
        still in flight, whose entries the host has not counted yet, grows the row by up to `room`, then
        the next step writes up to `room` entries."""
        return 2 * self.room

    @property
    def first_room(self) -> int:
        """Cache entries past a feed's end that the batched first-token call (`first`) writes."""
        return 0

    @classmethod
    def capacity_probe(cls, max_seq_len: int, config: DecodeConfig) -> int:
        """Cache positions per sequence; the margin covers a last step's drafts past the token budget.
        PIPO's entries are pairs, yet it needs as many: a pair whose token2 was rejected holds one token
        plus a PAD, so at tau >= 1 every pair does, and `max_seq_len` counts the tokens a sequence shows."""
        return max_seq_len + 2 * cls.room_for(config)

    def kv_len(self, seqs: dict[int, Sequence]) -> int:
        """Keys a step attends over: the whole table under CUDA graphs, else just what the rows use."""
        if self.graphs_enabled:
            return self.capacity
        return min(self.capacity, max(s.length for s in seqs.values()) + self.reach + 1)

    def graph_examples(self, batch: int) -> list[tuple[GraphedFn, tuple[torch.Tensor, ...]]]:
        """The decode-step calls to capture for one batch-size bucket."""
        raise NotImplementedError

    def capture(self, buckets: list[int]) -> None:
        """Capture CUDA graphs of every decode-step call for rows `[0, B)` per bucket (before any request)."""
        self.buckets = list(buckets)
        for batch in buckets:
            for fn, examples in self.graph_examples(batch):
                fn.capture(slice(0, batch), self.capacity, *examples)
        self.samplers.clear()
        self.set_mode(self.mode)

    # sampling steps: names of methods (rows, kv_len, *tensors) -> values, captured per sampling mode
    sample_fns: tuple[str, ...] = ()

    def sample_examples(self, batch: int) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per sampling step, its inputs for bucket `batch`: the model graphs' static outputs."""
        return {}

    # ---------------------------------------------------------------- model pieces
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.parts.base.embed_tokens(ids)

    def inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """Backbone inputs for token ids [B, T * unit_width]."""
        return self.embed(ids)

    def lm(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype: sampling converts what it needs (a bf16 top-k reads a quarter of the
        bytes of an fp32 one, and the argmax of exact conversions is the same)."""
        return self.parts.lm_head(hidden)

    def _backbone_step(self, rows: slice, kv_len: int, ids: torch.Tensor, positions: torch.Tensor):
        hidden = self.backbone.forward(self.inputs(ids), rows, positions, kv_len, record=self.record_steps > 0)
        return hidden, self.lm(hidden)

    def _mtp_hidden(self, rows: slice | torch.Tensor, kv_len: int | None, tokens: torch.Tensor, hidden: torch.Tensor,
                    positions: torch.Tensor, prefill: Spans | None = None) -> torch.Tensor:
        x = self.parts.mtp.fuse_inputs(self.embed(tokens), hidden)
        return self.mtp.forward(x, rows, positions, kv_len, prefill=prefill)

    def _mtp_step(self, rows: slice, kv_len: int, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        m = self._mtp_hidden(rows, kv_len, tokens, hidden, positions)
        return m, self.lm(m)

    # ---------------------------------------------------------------- sampling
    def set_mode(self, mode: SamplingMode) -> None:
        """The sampling transforms the running rows need; under CUDA graphs each mode's sampling steps are
        captured once, maybe while sequences run: the buffers their warm-ups write are put back after."""
        if mode not in self.samplers:
            self.mode = mode
            fns = {name: GraphedFn(getattr(self, name)) for name in self.sample_fns}
            if self.graphs_enabled and self.buckets:
                kept = (self.pending.clone(), self.seen.clone())
                with torch.no_grad():
                    for batch in self.buckets:
                        for name, examples in self.sample_examples(batch).items():
                            fns[name].capture(slice(0, batch), self.capacity, *examples, share=True)
                self.pending.copy_(kept[0])
                self.seen.copy_(kept[1])
            self.samplers[mode] = fns
        self.mode = mode
        self.sampler = self.samplers[mode]

    def set_row(self, slot: int, params: SamplingParams, seed: int) -> None:
        """A slot's sampling parameters and seed. `fill_` takes the value as a kernel argument; an indexed
        assignment of a Python number copies it from host memory, which first waits for every queued step."""
        self.row.temperature[slot].fill_(params.temperature)
        self.row.top_p[slot].fill_(params.top_p)
        self.row.top_k[slot].fill_(params.top_k)
        self.row.min_p[slot].fill_(params.min_p)
        self.row.presence[slot].fill_(params.presence_penalty)
        self.seeds[slot].fill_(seed32(seed))

    def to_device(self, values: list) -> torch.Tensor:
        """`values` as a long tensor on the device without waiting for queued work (on CUDA a non-blocking copy
        from pinned memory; a copy from ordinary host memory synchronises with the stream first)."""
        host = torch.tensor(values, dtype=torch.long)
        return host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host

    def uniforms(self, rows: slice, salt: int, width: int | None = None) -> torch.Tensor | None:
        """Counter-based uniforms [B, width] of the rows at their current cache lengths (None when all greedy)."""
        if self.mode.greedy:
            return None
        return self.noise(rows, salt).at(torch.arange(width or self.vocab, device=self.device)[None], self.fused())

    def noise(self, rows: slice, salt: int) -> RowNoise:
        """The rows' counter-based noise: their seeds, their cache lengths as counters."""
        return RowNoise(self.seeds[rows], self.lengths[rows], salt)

    def fused(self) -> bool:
        """Whether sampling's elementwise stretches run compiled: inside graph captures, like the layers'
        segments (`graphs.capturing`); the noise alone is a dozen integer ops over [B, columns]."""
        return self.config.compile_layers and capturing()

    def probs(self, logits: torch.Tensor, rows: slice, seen: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """Processed distributions of logits [B * repeat, V] (each row's `repeat` entries consecutive)."""
        params = self.row[rows]
        if repeat > 1:
            params = RowParams(*(t.repeat_interleave(repeat) for t in vars(params).values()))
        return row_probabilities(logits, params, self.mode, self.banned, seen)

    def pick(self, logits: torch.Tensor, rows: slice, salt: int) -> torch.Tensor:
        """One token per row of `logits` [B, V], which it consumes: banned ids go to -inf in place (sampling's
        out-of-place ban copies the whole logits, ~60 us at 256 x 248K on an H200, twice per PIPO step)."""
        if self.banned is not None:
            logits.index_fill_(-1, self.banned, float("-inf"))
        return sample_rows(logits, self.row[rows], self.mode, self.noise(rows, salt), None, self.seen[rows],
                           fused=self.fused())

    def live(self, seqs: dict[int, Sequence], values: list, stepped: bool, width: int):
        """`(sequence, its values)` for sequences still running; a `stepped` pass counts and grows them by `width`.

        A step's values are indexed by slot, those of `first` by the sequence's place in `seqs`.
        Values come one step late, so a sequence may have stopped since its step was queued.
        """
        for i, (slot, seq) in enumerate(seqs.items()):
            if seq.done:
                continue
            if stepped:
                seq.stats.forward_passes += 1
                seq.length += width
            yield seq, values[slot if stepped else i]

    def mark_seen(self, rows: slice | torch.Tensor, tokens: torch.Tensor, where: torch.Tensor | None = None) -> None:
        """Mark `tokens` [B] present in the rows (a range of slots, or the slots of an index tensor); nothing to do
        while no running row has a presence penalty: only the penalty reads `seen`, and the mode has one from
        the first token of any row that has one (a resumed row gets its tokens back in `reset`)."""
        if not self.mode.penalty:
            return
        if isinstance(rows, slice):
            seen, index = self.seen[rows], torch.arange(tokens.shape[0], device=tokens.device)
        else:
            seen, index = self.seen, rows
        # a device tensor as the value: a Python `True` would be a host-to-device copy (not capturable)
        seen[index, tokens] = torch.ones_like(tokens, dtype=torch.bool) if where is None else seen[index, tokens] | where

    # ---------------------------------------------------------------- slots
    def positions(self, batch: int, steps: int) -> torch.Tensor:
        """Positions of the next `steps` entries of rows [0, B), inside the table. An idle row (its table at
        the sink block 0, which no sequence holds) sits at 0: its attention reads `steps` keys, where its
        growing length would make it read the whole table, the longest row of a draining batch."""
        offsets = torch.arange(steps, device=self.device)
        return (self.lengths[:batch, None] * (self.tables[:batch, :1] != 0) + offsets).clamp(max=self.capacity - 1)

    def advance(self, batch: int, entries: torch.Tensor | int) -> None:
        """Grow the rows' caches by `entries` (the host counts passes and lengths when it emits).

        Idle rows grow too (their positions stay at 0, see `positions`, and a slot's length is set
        again when it next starts): a mask of the active rows would be a host-to-device copy, which
        waits for the step's queued GPU work.
        """
        self.lengths[:batch] += entries

    def reset(self, slot: int, seen: list[int] = ()) -> None:
        """Clear a slot for a new sequence; `seen`: tokens it already emitted (a preempted sequence's)."""
        self.backbone.reset(slot)
        if self.mtp is not None:
            self.mtp.reset(slot)
        self.seen[slot].fill_(False)
        if seen:
            self.seen[slot].index_fill_(0, self.to_device(sorted(set(seen))), True)
        self.lengths[slot].fill_(0)

    def move(self, src: int, dst: int) -> None:
        """Copy a row's per-sequence state to another row (a prefilled sequence to its decode slot)."""
        for stack in (self.backbone, self.mtp):
            if stack is not None:
                stack.load_linear(dst, stack.save_linear(src))
        for buffer in (self.lengths, self.h_last, self.seen, self.pending, self.tables, self.seeds,
                       *vars(self.row).values()):
            buffer[dst] = buffer[src]

    def copy_block(self, src: int, dst: int) -> None:
        self.backbone.copy_block(src, dst)
        if self.mtp is not None:
            self.mtp.copy_block(src, dst)

    def save_state(self, slot: int) -> dict:
        """A slot's non-paged prompt state right after prefill (linear states, last hidden), for the prefix cache."""
        return {
            "backbone": self.backbone.save_linear(slot),
            "mtp": self.mtp.save_linear(slot) if self.mtp is not None else None,
            "h": self.h_last[slot].clone(),
        }

    def load_state(self, slot: int, saved: dict, length: int) -> None:
        self.backbone.load_linear(slot, saved["backbone"])
        if self.mtp is not None:
            self.mtp.load_linear(slot, saved["mtp"])
        self.h_last[slot] = saved["h"]
        self.lengths[slot].fill_(length)

    def prefill_length(self, units: int) -> int:
        """Positions of a feed of `units` that prefill forwards run (the rest, the first decode step)."""
        return units - 1 if self.decodes_last_unit else units

    def hold(self, slot: int, unit: tuple[int, ...]) -> None:
        """The input of a slot's first decode step: its feed's last unit (`decodes_last_unit`)."""
        self.pending[slot, : self.unit_width] = self.to_device(list(unit))

    @property
    def _mtp_lag(self) -> int:
        """How far the MTP cache's prefilled entries trail the backbone's: entry i needs position i+1's first
        token, which the feed holds unless position i is its last (then the token sampled after it; a
        `decodes_last_unit` prefill never runs that position)."""
        return 0 if self.decodes_last_unit else 1

    def mtp_entries(self, length: int) -> int:
        """Entries every cache holds once `length` positions are prefilled."""
        return max(length - self._mtp_lag, 0) if self.mtp is not None else length

    @torch.no_grad()
    def prefill(self, chunks: list[PrefillChunk]) -> None:
        """Run the backbone over positions `lo..hi-1` of each chunk's `units` (earlier ones are in the cache),
        every chunk in one forward: packed end to end in one row (`Spans`), rows by index.

        With an MTP head, its cache gets the gold entries too: entry i takes the first token
        of position i+1 and the backbone hidden h_i (`_prefill_mtp`).
        """
        w = self.unit_width
        rows = self.to_device([c.row for c in chunks])
        spans = self._spans([c.lo for c in chunks], [c.hi - c.lo for c in chunks])
        ids = self.to_device([[t for c in chunks for t in c.units[c.lo * w : c.hi * w]]])
        hidden = self.backbone.forward(self.inputs(ids), rows, self._positions(spans), prefill=spans)
        if self.mtp is not None:
            self._prefill_mtp(chunks, rows, hidden)
        self.h_last[rows] = hidden[0, spans.cu_seqlens[1:] - 1]
        self.lengths[rows] = self.to_device([c.hi for c in chunks])

    def _prefill_mtp(self, chunks: list[PrefillChunk], rows: torch.Tensor, hidden: torch.Tensor) -> None:
        """The MTP cache entries of a prefill forward (hidden [1, N, H], packed as the chunks): entry i, fed (first
        token of position i+1, h_i), is written by the chunk that computes position i + `_mtp_lag` (h_{lo-1} is
        the row's last hidden of its previous chunk). A chunk without entries is left out."""
        w, n, lag = self.unit_width, len(chunks), self._mtp_lag
        kept, sources, offset = [], [], 0  # sources: rows of [h_last of the chunks' rows; the packed hiddens]
        for i, c in enumerate(chunks):
            first = max(c.lo - lag, 0)
            if c.hi - lag > first:
                kept.append(i)
                sources += ([i] if first < c.lo else []) + list(range(n + offset, n + offset + c.hi - lag - c.lo))
            offset += c.hi - c.lo
        if not kept:
            return
        firsts = [max(chunks[i].lo - lag, 0) for i in kept]
        ends = [chunks[i].hi - lag for i in kept]
        gold = [t for i, f, end in zip(kept, firsts, ends) for t in chunks[i].units[(f + 1) * w : (end + 1) * w : w]]
        spans = self._spans(firsts, [end - f for f, end in zip(firsts, ends)])
        hs = torch.cat([self.h_last[rows], hidden[0]])[self.to_device(sources)][None]
        self._mtp_hidden(rows[self.to_device(kept)], None, self.to_device([gold]), hs, self._positions(spans),
                         prefill=spans)

    def _spans(self, starts: list[int], counts: list[int]) -> Spans:
        """Sequences from positions `starts[i]`, `counts[i]` (>= 1) entries each, packed end to end."""
        offsets = tuple(itertools.accumulate(counts, initial=0))
        cu_seqlens = self.to_device(list(offsets))
        sequence = torch.repeat_interleave(torch.arange(len(counts), device=self.device), cu_seqlens.diff(),
                                           output_size=offsets[-1])
        return Spans(tuple(starts), offsets, cu_seqlens, sequence)

    def _positions(self, spans: Spans) -> torch.Tensor:
        """Positions [1, N] of the packed entries, each sequence's from its start (clamped inside the tables: the
        warm-up's rows may be longer than a sequence can be)."""
        local = torch.arange(spans.offsets[-1], device=self.device) - spans.cu_seqlens[spans.sequence]
        return (self.to_device(list(spans.starts))[spans.sequence] + local).clamp(max=self.capacity - 1)[None]

    def warm_prefill(self, rows: list[int]) -> None:
        """Short prefill forwards before any request: kernels that compile per shape class or autotune do it now
        rather than for seconds in the middle of a run. Triton specialises on whether a length divides by 16
        and on lengths of 1, torch.compile on one sequence or several, so every row count runs with a packed
        length of each kind (multiples of 64, plus one), and lengths 1 and 2 run alone (the MTP head's prefill
        runs `_mtp_lag` fewer entries). The rows' tables point at the sink block (their writes land there) and
        their states are reset after."""
        if not rows:
            return
        chunk = kernels.FLA_CHUNK
        units = (0,) * (self.unit_width * (chunk + 2))  # a feed continues past every chunk (`_mtp_lag`)
        forwards = [[1], [2]] + [[chunk] * (n - 1) + [chunk + extra] for n in range(1, len(rows) + 1)
                                 for extra in (0, 1)]
        for sizes in forwards:
            self.prefill([PrefillChunk(row, units, 0, size) for row, size in zip(rows, sizes)])
        for row in rows:
            self.reset(row)

    def first_rows(self, seqs: dict[int, Sequence]) -> slice | torch.Tensor:
        """The rows of freshly prefilled slots (in `seqs` order, ascending): a range when contiguous (views, and
        under CUDA graphs a replay for slot 0), else an index tensor (calls run eagerly)."""
        slots = list(seqs)
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        return self.to_device(slots)

    def first(self, seqs: dict[int, Sequence]) -> Launched | None:
        """Sample the first token(s) of freshly prefilled slots `{slot: sequence}` (ascending slots), all rows in
        one batched call (decoders whose step takes several positions per row; the others `decodes_last_unit`);
        like `step`, the values come with `.finish()` (None: emitted already)."""
        raise NotImplementedError

    def step(self, batch: int, seqs: dict[int, Sequence]) -> Launched:
        """Queue one backbone pass for every active slot in rows [0, batch); emit with `.finish()`."""
        raise NotImplementedError


class RegularDecoder(Decoder):
    """The backbone alone, one token per pass."""

    decodes_last_unit = True
    sample_fns = ("sample_next",)

    def graph_examples(self, batch):
        zeros = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        return [(self.backbone_step, (zeros, zeros))]

    def sample_examples(self, batch):
        zeros = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        _, logits = self.backbone_step.output(slice(0, batch), self.capacity, zeros, zeros)
        return {"sample_next": (logits[:, -1],)}

    def sample_next(self, rows: slice, kv_len: int, logits: torch.Tensor) -> torch.Tensor:
        """Sample, mark presence and write the next input: the step's values [B, 1]."""
        token = self.pick(logits, rows, 0)
        self.mark_seen(rows, token)
        self.pending[rows, 0] = token
        return token[:, None]

    @torch.no_grad()
    def step(self, batch, seqs):
        rows, kv_len = slice(0, batch), self.kv_len(seqs)
        _, logits = self.backbone_step(rows, kv_len, self.pending[:batch, :1], self.positions(batch, 1))
        self.advance(batch, 1)
        return launch(seqs, self.sampler["sample_next"](rows, kv_len, logits[:, -1]), self._emit)

    def _emit(self, seqs: dict[int, Sequence], values: list) -> None:
        for seq, value in self.live(seqs, values, True, 1):
            seq.emit(value[0])


class PipoDecoder(Decoder):
    """Pair in, pair out: one backbone pass per pair, token2 drafted by the MTP head and gated by confidence."""

    unit_width = 2
    decodes_last_unit = True
    sample_fns = ("sample_first", "sample_second")

    def __init__(self, parts, slots, max_seq_len, config, graphs):
        self.uses_mtp = config.conf_threshold < 1  # tau >= 1 never drafts: skip the MTP step entirely
        super().__init__(parts, slots, max_seq_len, config, graphs)

    def inputs(self, ids):
        embeds = self.embed(ids)
        batch, length, hidden = embeds.shape
        return self.parts.compressor(embeds.reshape(batch, length // 2, 2 * hidden))

    def _mtp_step(self, rows, kv_len, tokens, hidden, positions):
        m = self._mtp_hidden(rows, kv_len, tokens, hidden, positions)
        return self.lm(m), self.parts.confidence_head(hidden, m)

    def graph_examples(self, batch):
        ids = torch.zeros(batch, 2, dtype=torch.long, device=self.device)
        one = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        calls = [(self.backbone_step, (ids, one))]
        if self.uses_mtp:
            hidden = self.h_last[:batch, None]
            calls.append((self.mtp_step, (one, hidden, one)))
        return calls

    def sample_examples(self, batch):
        rows = slice(0, batch)
        ids = torch.zeros(batch, 2, dtype=torch.long, device=self.device)
        one = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        _, logits = self.backbone_step.output(rows, self.capacity, ids, one)
        calls = {"sample_first": (logits[:, -1],)}
        if self.uses_mtp:
            logits2, conf = self.mtp_step.output(rows, self.capacity, one, self.h_last[:batch, None], one)
            calls["sample_second"] = (logits2[:, -1], conf[:, -1])
        return calls

    def sample_first(self, rows: slice, kv_len: int, logits: torch.Tensor) -> torch.Tensor:
        t1 = self.pick(logits, rows, 0)
        self.mark_seen(rows, t1)
        self.pending[rows, 0] = t1
        return t1

    def sample_second(self, rows: slice, kv_len: int, logits2: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
        """The MTP draft, kept when confident (else PAD): values [B, 2] (token2, kept)."""
        draft = self.pick(logits2, rows, 1)
        keep = torch.sigmoid(conf.float()) >= self.config.conf_threshold
        t2 = torch.where(keep, draft, torch.full_like(draft, self.parts.pad_token_id))
        self.mark_seen(rows, t2, keep)
        self.pending[rows, 1] = t2
        return torch.stack([t2, keep.long()], dim=1)

    @torch.no_grad()
    def step(self, batch, seqs):
        rows, kv_len, positions = slice(0, batch), self.kv_len(seqs), self.positions(batch, 1)
        hidden, logits = self.backbone_step(rows, kv_len, self.pending[:batch, :2], positions)
        self.advance(batch, 1)
        return launch(seqs, self._pair(rows, hidden, logits[:, -1], kv_len, positions), self._emit)

    def _pair(self, rows, hidden, logits, kv_len, positions) -> torch.Tensor:
        """Sample token1 from the backbone, then draft token2 with the MTP head (its entry at the backbone's
        `positions`) and gate it by confidence: values [B, 3] (token1, token2, kept)."""
        t1 = self.sampler["sample_first"](rows, kv_len, logits)
        if not self.uses_mtp:
            pad = torch.full_like(t1, self.parts.pad_token_id)
            self.pending[rows, 1] = pad
            return torch.stack([t1, pad, torch.zeros_like(t1)], dim=1)
        logits2, conf = self.mtp_step(rows, kv_len, t1[:, None], hidden, positions)
        second = self.sampler["sample_second"](rows, kv_len, logits2[:, -1], conf[:, -1])
        return torch.cat([t1[:, None], second], dim=1)

    def _emit(self, seqs: dict[int, Sequence], values: list) -> None:
        pad = self.parts.pad_token_id
        for seq, (a, b, kept) in self.live(seqs, values, True, 1):
            if seq.emit(a):
                continue
            if self.uses_mtp:
                seq.stats.drafted += 1
                seq.stats.accepted += kept
            if kept:
                seq.emit(b)
            else:
                seq.emit_pad(pad)


class MTPDecoder(Decoder):
    """Native MTP, unverified: each pass commits the backbone's token and the MTP head's draft after it."""

    uses_mtp = True

    @classmethod
    def room_for(cls, config: DecodeConfig) -> int:
        return 2

    def graph_examples(self, batch):
        ids = torch.zeros(batch, 2, dtype=torch.long, device=self.device)
        hidden = self.h_last[:batch, None].expand(batch, 2, -1).contiguous()
        return [(self.backbone_step, (ids, ids)), (self.mtp_step, (ids, hidden, ids))]

    @torch.no_grad()
    def first(self, seqs):
        rows = self.first_rows(seqs)
        hidden = self.h_last[rows][:, None]
        token = self.pick(self.lm(hidden)[:, -1], rows, 0)
        self.mark_seen(rows, token)
        positions = (self.lengths[rows] - 1)[:, None]
        values = self._draft(rows, token, token[:, None], hidden, positions, self.kv_len(seqs))
        return launch(seqs, values, functools.partial(self._emit, stepped=False))

    @torch.no_grad()
    def step(self, batch, seqs):
        rows, kv_len = slice(0, batch), self.kv_len(seqs)
        positions = self.positions(batch, 2)
        pending = self.pending[:batch].clone()
        hidden, logits = self.backbone_step(rows, kv_len, pending, positions)
        self.advance(batch, 2)
        token = self.pick(logits[:, -1], rows, 0)
        self.mark_seen(rows, token)
        # MTP entries t and t+1: (x_{t+1}, h_t) and (the new token, h_{t+1})
        tokens = torch.stack([pending[:, 1], token], dim=1)
        return launch(seqs, self._draft(rows, token, tokens, hidden, positions, kv_len), self._emit)

    def _draft(self, rows, token, tokens, hidden, positions, kv_len) -> torch.Tensor:
        _, logits = self.mtp_step(rows, kv_len, tokens, hidden, positions)
        draft = self.pick(logits[:, -1], rows, 1)
        self.mark_seen(rows, draft)
        self.pending[rows, 0], self.pending[rows, 1] = token, draft
        return torch.stack([token, draft], dim=1)

    def _emit(self, seqs: dict[int, Sequence], values: list, stepped: bool = True) -> None:
        for seq, (a, b) in self.live(seqs, values, stepped, 2):
            if seq.emit(a):
                continue
            seq.stats.drafted += 1
            seq.stats.accepted += 1
            seq.emit(b)


class EagleDecoder(Decoder):
    """EAGLE-style speculative decoding: the native MTP head drafts k tokens, one backbone pass verifies them."""

    uses_mtp = True
    # speculative acceptance drew the last token of a step: a resumed sequence continues from it, not redraws it
    resumes_from_last_token = True

    def __init__(self, parts, slots, max_seq_len, config, graphs):
        self.k = config.eagle_k
        self.record_steps = self.k + 1
        super().__init__(parts, slots, max_seq_len, config, graphs)
        self.q = torch.zeros(slots, self.k, parts.text_config.vocab_size, device=self.device)

    @classmethod
    def room_for(cls, config: DecodeConfig) -> int:
        return config.eagle_k + 1

    @property
    def reach(self) -> int:
        """The step in flight grows a row by up to k + 1 entries; the next one verifies k + 1 and its chained
        drafts run to k - 1 past the last accepted entry: 2k past the row's length on the device."""
        return self.room + 2 * self.k

    @property
    def first_room(self) -> int:
        """`first` drafts k - 1 chained entries past the feed's last position."""
        return self.k - 1

    def graph_examples(self, batch):
        ids = torch.zeros(batch, self.k + 1, dtype=torch.long, device=self.device)
        hidden = self.h_last[:batch, None].expand(batch, self.k + 1, -1).contiguous()
        one = ids[:, :1]
        return [(self.backbone_step, (ids, ids)), (self.mtp_step, (ids, hidden, ids)),
                (self.mtp_step, (one, hidden[:, :1], one))]

    @torch.no_grad()
    def first(self, seqs):
        """Sample the first tokens and draft after them; a resumed sequence drafts after its held last token
        instead, which puts it where an uninterrupted run is between steps (same draws from there on). The
        tokens are emitted now; every row drafts (a sequence that ended never uses its drafts)."""
        rows = self.first_rows(seqs)
        hidden = self.h_last[rows][:, None]
        held = [seq.held_token() for seq in seqs.values()]
        token = self.pick(self.lm(hidden)[:, -1], rows, 0)
        fresh = None
        if any(held):
            fresh = self.to_device([not h for h in held]).bool()
            token = torch.where(fresh, token, self.to_device([h[0] if h else 0 for h in held]))
        self.mark_seen(rows, token, fresh)
        for seq, value, kept in zip(seqs.values(), token.tolist(), held):
            if not kept:
                seq.emit(value)
        positions = (self.lengths[rows] - 1)[:, None]
        self._draft(rows, token, token[:, None], hidden, positions, torch.zeros_like(token), self.kv_len(seqs))

    def _draft(self, rows, last, tokens, hidden, positions, take, kv_len):
        """MTP over the newly verified entries, then k-1 chained steps on its own output; store drafts and q."""
        index = torch.arange(tokens.shape[0], device=self.device)
        m, logits = self.mtp_step(rows, kv_len, tokens, hidden, positions)
        m, logits, base = m[index, take][:, None], logits[index, take], positions[index, take]
        seen = self.seen[rows].clone()
        drafts = []
        for j in range(self.k):
            q = self.probs(logits, rows, seen)
            drafts.append(self._draw(q, rows, 1 + j))
            self.q[rows, j] = q
            seen[index, drafts[-1]] = True
            if j < self.k - 1:  # a row at the end of its budget: its draft positions stay inside the table
                position = (base + j + 1).clamp(max=self.capacity - 1)
                m, logits = self.mtp_step(rows, kv_len, drafts[-1][:, None], m, position[:, None])
                logits = logits[:, -1]
        self.pending[rows] = torch.stack([last, *drafts], dim=1)

    def _target_probs(self, logits: torch.Tensor, rows: slice, drafts: torch.Tensor) -> torch.Tensor:
        """Processed target distributions at the k+1 verified positions; presence penalty sees earlier drafts."""
        batch, steps, vocab = logits.shape
        seen = self.seen[rows][:, None].repeat(1, steps, 1)
        index = torch.arange(batch, device=self.device)
        for i in range(1, steps):
            seen[:, i] = seen[:, i - 1]
            seen[index, i, drafts[:, i - 1]] = True
        return self.probs(logits.reshape(-1, vocab), rows, seen.view(-1, vocab), steps).view(batch, steps, vocab)

    def _draw(self, probs: torch.Tensor, rows: slice, salt: int) -> torch.Tensor:
        """One id per row of `probs` with the rows' counter-based noise (the argmax when every row is greedy)."""
        u = self.uniforms(rows, salt)
        return probs.argmax(-1) if u is None else sample_probs(probs, u)

    @torch.no_grad()
    def step(self, batch, seqs):
        rows, kv_len = slice(0, batch), self.kv_len(seqs)
        positions = self.positions(batch, self.k + 1)
        ids = self.pending[:batch].clone()
        hidden, logits = self.backbone_step(rows, kv_len, ids, positions)
        drafts = ids[:, 1:]
        half = torch.full((batch, self.vocab), 0.5, device=self.device)
        accepted, token = speculative_accept(
            self._target_probs(logits, rows, drafts), self.q[:batch], drafts,
            uniforms=(self.uniforms(rows, 64, self.k) if not self.mode.greedy else half[:, : self.k]),
            residual_uniforms=(self.uniforms(rows, 65) if not self.mode.greedy else half),
        )
        self.backbone.commit(rows, accepted)
        self.advance(batch, accepted + 1)
        for j in range(self.k):
            self.mark_seen(rows, drafts[:, j], accepted > j)
        self.mark_seen(rows, token)
        values = torch.cat([accepted[:, None], drafts, token[:, None]], dim=1)  # before _draft rewrites pending
        index = torch.arange(batch, device=self.device)
        tokens = torch.cat([drafts, drafts[:, :1]], dim=1)
        tokens[index, accepted] = token
        self._draft(rows, token, tokens, hidden, positions, accepted, kv_len)
        return launch(seqs, values, self._emit)

    def _emit(self, seqs: dict[int, Sequence], values: list) -> None:
        for slot, seq in seqs.items():
            if seq.done:
                continue
            a, d, t = values[slot][0], values[slot][1:-1], values[slot][-1]
            seq.stats.forward_passes += 1
            seq.length += a + 1
            seq.stats.drafted += self.k
            seq.stats.accepted += a
            for tok in [*d[:a], t]:
                if seq.emit(tok):
                    break


DECODERS: dict[str, type[Decoder]] = {
    "regular": RegularDecoder,
    "pipo": PipoDecoder,
    "mtp": MTPDecoder,
    "eagle": EagleDecoder,
}
