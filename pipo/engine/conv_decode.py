"""A decode step's causal depthwise conv (Qwen3.5 linear attention) in one Triton kernel.

Why: at 256 rows the torch path of a decode token ran four kernels per linear-attention layer
(the window's concatenation, the conv with its SiLU, the copy of the window's tail back into
the conv history, and q/k/v made contiguous; ~48 us on an H200), each a full pass over
[B, K-1+T, C]. Here each program owns a channel block of one row: it loads the row's history and
new inputs, writes the conv's SiLU output and then the shifted history over the old one, so
the window is read once and the history written once (~8 us of bytes at 256 rows).
Same math as `stack._causal_conv` + SiLU, in fp32 with one rounding at the end (as torch.compile
fuses the torch path).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path runs there
    triton = None

BLOCK_CHANNELS = 256


def available(x: torch.Tensor) -> bool:
    """True where this kernel applies: Triton installed and a CUDA tensor."""
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _conv_kernel(X, HIST, W, BIAS, Y, C, x_row, x_step, hist_row, T: tl.constexpr, K: tl.constexpr,
                     ROWS: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Program (row, channel block): window rows 0..K-2 are the history, K-1..K-2+T the new inputs."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        r = tl.arange(0, ROWS)
        c_ok = c < C
        old = r < K - 1
        new = (r >= K - 1) & (r < K - 1 + T)
        hist = tl.load(HIST + b * hist_row + r[:, None] * C + c[None, :], mask=old[:, None] & c_ok[None, :], other=0.0)
        x = tl.load(X + b * x_row + (r - (K - 1))[:, None] * x_step + c[None, :], mask=new[:, None] & c_ok[None, :],
                    other=0.0)
        window = tl.where(old[:, None], hist, x.to(hist.dtype))
        if HAS_BIAS:
            bias = tl.load(BIAS + c, mask=c_ok, other=0.0).to(tl.float32)
        for t in tl.static_range(T):  # output t sums window rows t .. t+K-1 against taps 0 .. K-1
            tap = r - t
            w = tl.load(W + c[None, :] * K + tap[:, None], mask=(tap >= 0)[:, None] & (tap < K)[:, None] & c_ok[None, :],
                        other=0.0)
            acc = tl.sum(window.to(tl.float32) * w.to(tl.float32), 0)
            if HAS_BIAS:
                acc += bias
            tl.store(Y + (b * T + t) * C + c, (acc * tl.sigmoid(acc)).to(Y.dtype.element_ty), mask=c_ok)
        # the last K-1 window rows become the history, in place: row r-T is stored by the threads that hold row r,
        # which need not be those that loaded it, so every thread's loads finish first
        tl.debug_barrier()
        kept = (r >= T) & (r < T + K - 1)
        tl.store(HIST + b * hist_row + (r - T)[:, None] * C + c[None, :], window, mask=kept[:, None] & c_ok[None, :])


def conv_step(x: torch.Tensor, history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU(causal depthwise conv) of the new inputs `x` [B, T, C] after each row's `history` [B, K-1, C] (the
    last K-1 inputs before them; updated in place to the last K-1 of history + x), with `weight` [C, 1, K] and
    `bias` [C] or None -> [B, T, C] in history's dtype. `x` may be a strided view (a slice of a fused projection);
    each row of `history` must be contiguous. Never syncs (graph-capturable)."""
    batch, steps, channels = x.shape
    taps = weight.shape[-1]
    if history.shape != (batch, taps - 1, channels) or history.stride()[1:] != (channels, 1) or x.stride(2) != 1:
        raise ValueError(f"conv_decode: history must be [B, K-1, C] with contiguous rows and x [B, T, C] with "
                         f"contiguous channels, got x {tuple(x.shape)} {x.stride()}, history {tuple(history.shape)} "
                         f"{history.stride()}, weight {tuple(weight.shape)}")
    weight = weight.reshape(channels, taps).contiguous()
    out = torch.empty(batch, steps, channels, dtype=history.dtype, device=x.device)
    _conv_kernel[(batch, triton.cdiv(channels, BLOCK_CHANNELS))](
        x, history, weight, weight if bias is None else bias, out, channels, x.stride(0), x.stride(1),
        history.stride(0), T=steps, K=taps, ROWS=triton.next_power_of_2(taps - 1 + steps), BC=BLOCK_CHANNELS,
        HAS_BIAS=bias is not None,
    )
    return out
