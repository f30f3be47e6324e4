"""The sampler's top-k prefilter kernels: the maximum of each group of consecutive logits per row, then the
top-k of the best groups' logits.

Why: `z[:, :whole].reshape(rows, -1, group).amax(-1)` over 256 x 248K bf16 logits took 173 us on an
H200 where one read of them takes ~30 us. The Triton kernel here reads each logit once: every program
loads a tile of whole groups of one row and reduces it along the group axis. NaN propagates like
`torch.amax` (a group holding a NaN has maximum NaN). The second stage in torch (top-k of the maxima,
a gather, top-k of the gathered logits, the argmax's group) took 147 us more in a CUDA graph at 256
rows; `top_k_of_groups_triton` does it in one program per row that sorts packed (value, id) keys.
A torch path runs on CPU tensors and where Triton is missing. Imported lazily by `sampling.top_k`,
so importing the sampler never imports Triton.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path runs there
    triton = None

BLOCK = 4096  # logits per Triton program (a tile of BLOCK // group groups of one row)
SORT_LIMIT = 8192  # keys one program of `top_k_of_groups_triton` sorts at most (k x the group's power of two)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # reduced exactly in float32


def group_max(z: torch.Tensor, group: int) -> torch.Tensor:
    """[B, ceil(V / group)] maxima of `z` [B, V]: column g is max(z[:, g*group : (g+1)*group]), the last
    group covering the ragged tail. Triton on CUDA tensors of 16/32-bit floats, else torch."""
    if triton is not None and z.is_cuda and z.dtype in _TRITON_DTYPES:
        return group_max_triton(z, group)
    return group_max_torch(z, group)


def group_max_torch(z: torch.Tensor, group: int) -> torch.Tensor:
    """`group_max` by torch reductions: whole groups through a reshape, the ragged tail on its own."""
    rows, width = z.shape
    whole = width - width % group
    maxima = z[:, :whole].reshape(rows, -1, group).amax(-1)
    if whole == width:
        return maxima
    return torch.cat([maxima, z[:, whole:].amax(-1, keepdim=True)], dim=1)


def group_max_triton(z: torch.Tensor, group: int, block: int = BLOCK) -> torch.Tensor:
    """`group_max` in one Triton kernel (`block` logits per program, at least one group); a CPU tensor runs
    under Triton's interpreter (TRITON_INTERPRET=1). Allocates only the output, never syncs (graph-capturable)."""
    if z.stride(-1) != 1:
        z = z.contiguous()
    rows, width = z.shape
    groups = -(-width // group)
    out = torch.empty(rows, groups, dtype=z.dtype, device=z.device)
    block_group = triton.next_power_of_2(group)
    tile = max(1, block // block_group)
    _group_max_kernel[(rows, triton.cdiv(groups, tile))](
        z, out, width, z.stride(0), groups, GROUP=group, BLOCK_GROUP=block_group, TILE=tile)
    return out


def top_k_of_groups_fits(z: torch.Tensor, k: int, group: int) -> bool:
    """True where `top_k_of_groups_triton` applies: Triton, a CUDA tensor of 16/32-bit floats, k a power of two
    and k groups' keys within `SORT_LIMIT`."""
    return (triton is not None and z.is_cuda and z.dtype in _TRITON_DTYPES and k & (k - 1) == 0
            and k * triton.next_power_of_2(group) <= SORT_LIMIT)


def top_k_of_groups_triton(z: torch.Tensor, maxima: torch.Tensor, k: int, group: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the k largest values of each row of `z` [B, V], sorted descending; their ids; `z.argmax(-1)`) from the
    group maxima [B, G] (`group_max`, G > k), in one Triton program per row: sort the maxima's (value, group)
    keys, take the k best groups, sort their logits' (value, column) keys. Keys order as torch does (NaN
    above +inf, -0.0 equal to 0.0) and, among equal values, the lower id first: the first key is the
    argmax, the ids are distinct and inside the row. Allocates only its outputs, never syncs."""
    if z.stride(-1) != 1:
        z = z.contiguous()
    rows, width = z.shape
    groups = maxima.shape[1]
    values = torch.empty(rows, k, dtype=z.dtype, device=z.device)
    ids = torch.empty(rows, k, dtype=torch.long, device=z.device)
    argmax = torch.empty(rows, dtype=torch.long, device=z.device)
    best = torch.empty(rows, k, dtype=torch.long, device=z.device)  # scratch: each row's k best groups
    _top_k_of_groups_kernel[(rows,)](
        z, maxima.contiguous(), best, values, ids, argmax, width, z.stride(0), groups, K=k, GROUP=group,
        GROUPS_P2=triton.next_power_of_2(groups), BLOCK_GROUP=triton.next_power_of_2(group), num_warps=8)
    return values, ids, argmax


if triton is not None:

    @triton.jit
    def _keys(x, index):
        """int64 keys whose descending order is x's (NaN first, -0.0 as 0.0), then ascending `index` (< 2**31)."""
        x = tl.where(x != x, float("nan"), tl.where(x == 0, 0.0, x))
        bits = x.to(tl.int32, bitcast=True)
        ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
        return (ordered << 32) | (0x7FFFFFFF - index).to(tl.int64)

    @triton.jit
    def _key_value(key):
        ordered = (key >> 32).to(tl.int32)
        return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)

    @triton.jit
    def _key_index(key):
        return 0x7FFFFFFF - (key & 0xFFFFFFFF)

    @triton.jit
    def _top_k_of_groups_kernel(Z, MAXIMA, BEST, VALUES, IDS, ARGMAX, width, row_stride, groups, K: tl.constexpr,
                                GROUP: tl.constexpr, GROUPS_P2: tl.constexpr, BLOCK_GROUP: tl.constexpr):
        """Program `row`: BEST[row] = its K best groups, then VALUES/IDS[row] = the top K of their logits."""
        row = tl.program_id(0).to(tl.int64)
        g = tl.arange(0, GROUPS_P2)
        m = tl.load(MAXIMA + row * groups + g, mask=g < groups, other=float("-inf")).to(tl.float32)
        ranked = tl.sort(_keys(m, g), descending=True)  # padding: -inf at ids past the real groups, ranked last
        tl.store(BEST + row * K + g, _key_index(ranked), mask=g < K)
        tl.debug_barrier()  # the program's threads read back what others stored
        chosen = tl.load(BEST + row * K + tl.arange(0, K))
        offset = tl.arange(0, BLOCK_GROUP)
        columns = chosen[:, None] * GROUP + offset[None, :]
        inside = (offset[None, :] < GROUP) & (columns < width)
        x = tl.load(Z + row * row_stride + columns, mask=inside, other=float("-inf")).to(tl.float32)
        keys = tl.where(inside, _keys(x, columns), -0x7FFFFFFFFFFFFFFF)  # slots past a group or the row: last
        top = tl.sort(tl.reshape(keys, [K * BLOCK_GROUP]), descending=True)
        i = tl.arange(0, K * BLOCK_GROUP)
        tl.store(VALUES + row * K + i, _key_value(top).to(VALUES.dtype.element_ty), mask=i < K)
        tl.store(IDS + row * K + i, _key_index(top), mask=i < K)
        tl.store(ARGMAX + row + i, _key_index(top), mask=i < 1)


    @triton.jit
    def _max_nan(a, b):
        """Maximum that propagates NaN (`tl.max` drops it on GPU)."""
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _group_max_kernel(Z, OUT, width, row_stride, groups, GROUP: tl.constexpr, BLOCK_GROUP: tl.constexpr,
                          TILE: tl.constexpr):
        """Program (row, tile): OUT[row, g] for the TILE groups g of this tile; logits past `width` read as -inf."""
        row = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * TILE + tl.arange(0, TILE)
        offset = tl.arange(0, BLOCK_GROUP)
        columns = g[:, None] * GROUP + offset[None, :]
        inside = (offset[None, :] < GROUP) & (columns < width)
        x = tl.load(Z + row * row_stride + columns, mask=inside, other=float("-inf")).to(tl.float32)
        tl.store(OUT + row * groups + g, tl.reduce(x, 1, _max_nan).to(OUT.dtype.element_ty), mask=g < groups)
