"""The maximum of each group of consecutive logits per row: the read of the sampler's top-k prefilter.

Why: `z[:, :whole].reshape(rows, -1, group).amax(-1)` over 256 x 248K bf16 logits took 173 us on an
H200 where one read of them takes ~30 us. The Triton kernel here reads each logit once: every program
loads a tile of whole groups of one row and reduces it along the group axis. NaN propagates like
`torch.amax` (a group holding a NaN has maximum NaN). A torch path runs on CPU tensors and where Triton
is missing. Imported lazily by `sampling.top_k`, so importing the sampler never imports Triton.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path runs there
    triton = None

BLOCK = 4096  # logits per Triton program (a tile of BLOCK // group groups of one row)
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


if triton is not None:

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
