"""One decode token of the gated delta rule (Qwen3.5 linear attention) per row, in Triton.

Why: at 256 rows a decode step's linear-attention cost is reading and writing every fp32 state
[B, HV, Dk, Dv]; the rest (q/k/v, gates, output) is small. Here each program owns one
[Dk, BV] tile of one row's value head: it loads the tile first, so the state read is in flight
while q/k are normalised, then decays it, applies the delta update, takes the output, and
stores the tile over the initial state (or into a separate final one). On an H200 at 256 rows
this ran at 97% of copy bandwidth, flash-linear-attention's fused recurrent kernel at 90%.
Same math as `kernels.recurrent_delta_rule`'s torch path: q and k L2-normalised in fp32, q
scaled by Dk**-0.5, fp32 state; each key head serves HV/H value heads.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path runs there
    triton = None

# (value-tile width, warps) timed per shape, the first used while a CUDA graph is being captured (the fastest
# measured at 256 rows x 32 value heads of 128 x 128 on an H200). One warp on 64-wide or two on 128-wide tiles
# spill registers (7-10x slower), so those are not tried.
CONFIGS = ((64, 4), (32, 1), (32, 2), (64, 2), (128, 4))


def available(q: torch.Tensor) -> bool:
    """True where this kernel applies: Triton installed and a CUDA tensor."""
    return triton is not None and q.is_cuda


if triton is not None:

    @triton.jit
    def _step_kernel(Q, K, V, G, BETA, S0, S1, O, scale, q_row, k_row, v_row, H: tl.constexpr, HV: tl.constexpr,
                     DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, TILES: tl.constexpr):
        """Program (row x value head) * TILES + value tile: S1[tile] = updated S0[tile], O[tile] = q . S1[tile]."""
        pid = tl.program_id(0)
        bh = pid // TILES
        b = bh // HV
        hv = bh % HV
        h = hv // (HV // H)
        dk = tl.arange(0, BK)
        dv = (pid % TILES) * BV + tl.arange(0, BV)
        k_ok = dk < DK
        v_ok = dv < DV
        tile = bh.to(tl.int64) * DK * DV + dk[:, None] * DV + dv[None, :]
        tile_ok = k_ok[:, None] & v_ok[None, :]
        s = tl.load(S0 + tile, mask=tile_ok, other=0.0)
        q = tl.load(Q + b * q_row + h * DK + dk, mask=k_ok, other=0.0).to(tl.float32)
        k = tl.load(K + b * k_row + h * DK + dk, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(V + b * v_row + hv * DV + dv, mask=v_ok, other=0.0).to(tl.float32)
        decay = tl.exp(tl.load(G + bh).to(tl.float32))
        beta = tl.load(BETA + bh).to(tl.float32)
        q = q * (scale / tl.sqrt(tl.sum(q * q) + 1e-6))
        k = k * (1.0 / tl.sqrt(tl.sum(k * k) + 1e-6))
        s = s * decay
        delta = (v - tl.sum(s * k[:, None], 0)) * beta
        s = s + k[:, None] * delta[None, :]
        tl.store(O + bh * DV + dv, tl.sum(s * q[:, None], 0).to(O.dtype.element_ty), mask=v_ok)
        tl.store(S1 + tile, s, mask=tile_ok)


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial: torch.Tensor,
    final: torch.Tensor,
    block_v: int,
    warps: int,
) -> torch.Tensor:
    """One token: q/k [B, 1, H, Dk], v [B, 1, HV, Dv] (HV a multiple of H), g (log decay) and beta [B, 1, HV];
    reads `initial` and writes `final` ([B, HV, Dk, Dv] fp32, contiguous; the same tensor updates in place).
    q, k and v may be row-strided views (the conv kernel's output split into heads) whose heads are contiguous.
    Returns the output [B, 1, HV, Dv] in v's dtype. Allocates only the output and never syncs (graph-capturable).
    """
    batch, steps, heads, dk = k.shape
    v_heads, dv = v.shape[2], v.shape[3]
    if steps != 1 or v_heads % heads:
        raise ValueError(f"delta_decode: one token per row and value heads a multiple of key heads, got "
                         f"q/k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, state in (("initial", initial), ("final", final)):
        if state.shape != (batch, v_heads, dk, dv) or state.dtype != torch.float32 or not state.is_contiguous():
            raise ValueError(f"delta_decode: {name} state must be contiguous fp32 {(batch, v_heads, dk, dv)}, "
                             f"got {state.dtype} {tuple(state.shape)}")
    q, k, v = (_heads_contiguous(t) for t in (q, k, v))
    g, beta = g.contiguous(), beta.contiguous()
    block_v = min(block_v, triton.next_power_of_2(dv))
    tiles = -(-dv // block_v)
    out = torch.empty(batch, 1, v_heads, dv, dtype=v.dtype, device=v.device)
    _step_kernel[(batch * v_heads * tiles,)](
        q, k, v, g, beta, initial, final, out, dk**-0.5, q.stride(0), k.stride(0), v.stride(0),
        H=heads, HV=v_heads, DK=dk, DV=dv,
        BK=triton.next_power_of_2(dk), BV=block_v, TILES=tiles, num_warps=warps, num_stages=1,
    )
    return out


def _heads_contiguous(x: torch.Tensor) -> torch.Tensor:
    """`x` [B, 1, heads, D] with each row's heads contiguous (rows may be strided), copied only when not."""
    return x if x.stride()[2:] == (x.shape[3], 1) else x.contiguous()
