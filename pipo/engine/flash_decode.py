"""Split-K ("flash-decoding") attention of a few new queries per row over a paged KV cache, in Triton.

Why: a decode step has 1 to k+1 queries per row, so SDPA runs one program per (row,
KV head) over the whole static capacity: 4 programs for 132 SMs at batch 1, with masked
keys past each row's length still read. Here every (row, KV head) splits the filled part
of its own cache (up to its furthest query position) into the same number of chunks, enough
to fill the GPU: a step reads only what the rows hold, the grid stays fixed, as CUDA graphs
need, and a long row's work spreads over as many programs as a short one's, so a batch of
mixed lengths does not wait on one program reading the longest row. A second small kernel
merges the chunks' partial softmaxes. Queries of one KV head's group share each K/V tile
(grouped-query attention). Keys are read through each row's block table: a tile of `BLOCK_N`
keys lies inside one pool block (the block size is a multiple of `BLOCK_N`), found by one
table load.
"""
from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine uses SDPA there
    triton = None


BLOCK_N = 32  # keys per tile: with head dim 256, two stages of K and V tiles take 64 KB, 3 programs per SM


@functools.lru_cache(maxsize=1)
def multiprocessors() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def available(q: torch.Tensor, block_size: int) -> bool:
    """True where this kernel applies: Triton on a CUDA tensor, power-of-two head dim >= 16, blocks of >= 16."""
    d = q.shape[-1]
    return triton is not None and q.is_cuda and d >= 16 and d & (d - 1) == 0 and tile(block_size) >= 16


def tile(block_size: int) -> int:
    """Keys per kernel tile for pool blocks of `block_size` positions (a divisor of it)."""
    return min(BLOCK_N, block_size & -block_size)


if triton is not None:

    @triton.jit
    def _partial_kernel(
        Q, K, V, TABLE, POS, M, L, ACC,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_tb, stride_pb,
        scale, n_rows,
        HKV: tl.constexpr, STEPS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
        BS: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = bh // HKV
        h = bh % HKV
        rows = tl.arange(0, ROWS)
        dims = tl.arange(0, D)
        row_ok = rows < n_rows
        pos = tl.load(POS + b * stride_pb + rows % STEPS, mask=row_ok, other=-1)
        filled = tl.load(POS + b * stride_pb + STEPS - 1) + 1  # the last query sees most
        keys_per_chunk = tl.cdiv(tl.cdiv(filled, BLOCK), n_splits) * BLOCK  # whole tiles: chunk 0 holds key 0
        lo = split * keys_per_chunk
        hi = tl.minimum(lo + keys_per_chunk, filled)
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.0)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        for start in range(lo, hi, BLOCK):
            n = start + tl.arange(0, BLOCK)
            key_ok = n < hi
            block = tl.load(TABLE + b * stride_tb + start // BS).to(tl.int64)
            at = (start % BS + tl.arange(0, BLOCK))[:, None]
            k_base = K + block * stride_kb + h * stride_kh
            v_base = V + block * stride_vb + h * stride_vh
            k = tl.load(k_base + at * stride_kn + dims[None, :], mask=key_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where((n[None, :] <= pos[:, None]) & key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            v = tl.load(v_base + at * stride_vn + dims[None, :], mask=key_ok[:, None], other=0.0)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = (bh * n_splits + split) * ROWS + rows
        tl.store(M + out, m)
        tl.store(L + out, l)
        tl.store(ACC + out[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])  # padding rows are never read

    @triton.jit
    def _merge_kernel(M, L, ACC, O, n_splits, n_rows, ROWS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                      CHUNK: tl.constexpr):
        """One program per (row x KV head, query row): weights every chunk's partial by exp(m - max m)."""
        bh = tl.program_id(0)
        row = tl.program_id(1)
        dims = tl.arange(0, D)
        splits = tl.arange(0, SPLITS)
        ok = splits < n_splits
        at = (bh * n_splits + splits) * ROWS + row
        m = tl.load(M + at, mask=ok, other=float("-inf"))
        m_max = tl.max(m, 0)  # finite: the first chunk always holds key 0
        l = tl.sum(tl.exp(m - m_max) * tl.load(L + at, mask=ok, other=0.0), 0)
        acc = tl.zeros([D], tl.float32)
        for first in range(0, n_splits, CHUNK):
            chunk = first + tl.arange(0, CHUNK)
            at_c = (bh * n_splits + chunk) * ROWS + row
            m_c = tl.load(M + at_c, mask=chunk < n_splits, other=float("-inf"))
            tile = tl.load(ACC + at_c[:, None] * D + dims[None, :], mask=(chunk < n_splits)[:, None], other=0.0)
            acc += tl.sum(tile * tl.exp(m_c - m_max)[:, None], 0)
        tl.store(O + (bh * n_rows + row) * D + dims, (acc / l).to(O.dtype.element_ty))


def chunk_count(batch: int, kv_heads: int, capacity: int, block: int, sms: int) -> int:
    """Chunks per (row, KV head): enough that the grid holds ~8 programs per multiprocessor, and no more
    than a full table has tiles."""
    return max(1, min(triton.cdiv(capacity, block), triton.cdiv(8 * sms, batch * kv_heads)))


def paged_decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, positions: torch.Tensor,
    scale: float, sms: int | None = None, n_splits: int | None = None,
) -> torch.Tensor:
    """Causal attention of queries `q` [B, Hkv, G*T, D] (row g*T + t is query t of group head g) at `positions`
    [B, T] (non-decreasing along T) over pools [num_blocks, Hkv, block_size, D] through block tables
    [B, max_blocks]; the pools already hold the new keys. Returns [B, Hkv, G*T, D].
    `sms` (multiprocessors) sizes the split (`chunk_count`), the current CUDA device's by default; `n_splits`
    forces the number of chunks per row."""
    batch, kv_heads, n_rows, d = q.shape
    block_size = k_pool.shape[2]
    block = tile(block_size)
    capacity = tables.shape[1] * block_size
    rows = max(16, triton.next_power_of_2(n_rows))
    n_splits = n_splits or chunk_count(batch, kv_heads, capacity, block, sms or multiprocessors())
    q = q.contiguous()
    positions = positions.contiguous()
    m = torch.empty(batch * kv_heads * n_splits * rows, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(m.numel(), d, device=q.device, dtype=torch.float32)
    _partial_kernel[(batch * kv_heads, n_splits)](
        q, k_pool, v_pool, tables, positions, m, l, acc,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), tables.stride(0), positions.stride(0),
        scale, n_rows,
        HKV=kv_heads, STEPS=positions.shape[1], ROWS=rows, D=d, BLOCK=block, BS=block_size, num_warps=4, num_stages=2,
    )
    out = torch.empty_like(q)
    _merge_kernel[(batch * kv_heads, n_rows)](m, l, acc, out, n_splits, n_rows, ROWS=rows, D=d,
                                             SPLITS=triton.next_power_of_2(n_splits), CHUNK=16, num_warps=4)
    return out
