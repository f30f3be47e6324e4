"""Paged KV memory on the host side: the block allocator and the block-based prefix cache.

Every full-attention cache (backbone layers, the MTP layer) is a pool of `num_blocks`
blocks of `block_size` positions; one block id addresses the same block in every pool,
so one block table per sequence serves all of them. Block 0 is never handed out: rows
of a decode batch that hold no sequence point every table entry at it, so their writes
land there. Blocks are reference-counted: the full prompt blocks of a cached prompt are
shared by its samples and by the prefix-cache entry that keeps them.

A prefix-cache entry is the state right after a prompt's prefill: its full blocks (shared),
a private copy of its last partial block, and the per-sequence state that is not paged
(gated-delta-net conv/recurrent states, the last hidden state). A hybrid model's linear
states exist only at the points where they were saved, so a cached prefix is usable from
the end of a cached prompt; a new prompt that extends one prefills only its remainder.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from pipo.errors import PIPOError


class BlockPool:
    """Reference-counted block ids `1..num_blocks-1` (0 is the write sink of idle rows)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise PIPOError(f"the KV pool needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # a stack: low ids first

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        return len(self.free)

    def take(self, count: int) -> list[int]:
        if count > len(self.free):
            raise PIPOError(f"asked for {count} KV blocks with {len(self.free)} free")
        taken = [self.free.pop() for _ in range(count)]
        for b in taken:
            self.refs[b] = 1
        return taken

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)
            elif self.refs[b] < 0:
                raise PIPOError(f"KV block {b} released more often than taken")


@dataclass
class CachedPrompt:
    """A prompt's post-prefill state: `blocks` (full ones shared, the last a private copy of the partial one)."""

    units: tuple[int, ...]
    blocks: list[int]
    length: int  # backbone positions
    state: dict  # non-paged per-sequence state (linear states, last hidden)
    waiting: int = 0  # samples queued that will start from it (kept from LRU eviction while > 0)
    hits: int = field(default=0)


class PrefixCache:
    """LRU map from prompt units to `CachedPrompt`; lookups find the longest cached prefix of a prompt.

    `capacity` bounds the entries nobody waits for; the pool may evict any entry when it runs out.
    """

    def __init__(self, pool: BlockPool, capacity: int) -> None:
        self.pool = pool
        self.capacity = capacity
        self.entries: OrderedDict[tuple[int, ...], CachedPrompt] = OrderedDict()
        self.lookups = 0
        self.evicted = 0  # entries dropped because the pool ran out of blocks
        self.hit_blocks = 0
        self.looked_blocks = 0

    def lookup(self, units: tuple[int, ...], width: int, block_size: int) -> CachedPrompt | None:
        """The longest cached prompt that `units` starts with (a whole number of `width`-token units)."""
        best = self.entries.get(units)
        if best is None:
            for key, entry in self.entries.items():
                if len(key) < len(units) and len(key) % width == 0 and units[: len(key)] == key and (
                        best is None or len(key) > len(best.units)):
                    best = entry
        if best is not None:
            self.entries.move_to_end(best.units)
        return best

    def count(self, units: tuple[int, ...], hit: CachedPrompt | None, width: int, block_size: int) -> None:
        """Statistics of an admitted prompt: its blocks, and those its cache hit served."""
        self.lookups += 1
        self.looked_blocks += len(units) // width // block_size
        if hit is not None:
            hit.hits += 1
            self.hit_blocks += hit.length // block_size

    def store(self, entry: CachedPrompt) -> None:
        old = self.entries.pop(entry.units, None)
        if old is not None:
            self.pool.release(old.blocks)
        self.entries[entry.units] = entry
        self._trim()

    def _trim(self) -> None:
        idle = [k for k, e in self.entries.items() if e.waiting <= 0]
        for key in idle[: max(0, len(idle) - self.capacity)]:
            self.pool.release(self.entries.pop(key).blocks)

    def evict(self, needed: int) -> None:
        """Drop least recently used entries (idle ones first) until `needed` blocks are free or none is left."""
        for only_idle in (True, False):
            for key in list(self.entries):
                if self.pool.available >= needed:
                    return
                if only_idle and self.entries[key].waiting > 0:
                    continue
                self.pool.release(self.entries.pop(key).blocks)
                self.evicted += 1

    def clear(self) -> None:
        self.evict(self.pool.num_blocks)

    @property
    def hit_rate(self) -> float:
        """Prompt blocks served from the cache over prompt blocks looked up."""
        return self.hit_blocks / self.looked_blocks if self.looked_blocks else 0.0
