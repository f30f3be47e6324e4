"""Gated delta rule (Qwen3.5 linear attention) steps. On GPU: one decode token per row runs our Triton kernel
(`delta_decode`), longer inputs flash-linear-attention's kernels when installed; torch otherwise (and on CPU).

Every path follows Hugging Face's reference semantics: q and k are L2-normalised in
fp32, q is scaled by 1/sqrt(d_k), and the recurrent state is fp32.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch


@functools.lru_cache(maxsize=1)
def fla_ops():
    """`(chunk, fused_recurrent kernel)` from flash-linear-attention, or None when it is not installed.

    Recurrent steps that fla runs (several tokens per row, or EAGLE's per-token states) launch
    its kernel itself rather than through its wrapper, so that the final state is written over
    the initial one (or into the next token's buffer): the wrapper allocates a new
    state, and copying it back costs a full extra read and write of every state.
    """
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule_fwd_kernel
    except ImportError:
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule_fwd_kernel


def _use_fla(x: torch.Tensor):
    return fla_ops() if x.is_cuda else None


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _fla_recurrent(kernel, q, k, v, g, beta, initial: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """fla's fused recurrent step over q/k [B, T, H, Dk], v [B, T, HV, Dv] (HV a multiple of H):
    reads `initial` and writes `final` ([B, HV, Dk, Dv] fp32, contiguous; they may be the same tensor).
    The value-tile width and warps are the fastest of `LAUNCH_CONFIGS` for this shape."""
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    launch = functools.partial(_launch, kernel)
    block_v, warps = _launch_config(launch, LAUNCH_CONFIGS, tuple(k.shape), tuple(v.shape), q.dtype)
    return launch(q, k, v, g, beta, initial, final, block_v, warps)


def _launch(kernel, q, k, v, g, beta, initial, final, block_v: int, warps: int) -> torch.Tensor:
    batch, steps, heads, dk = k.shape
    v_heads, dv = v.shape[2], v.shape[3]
    block_v = min(block_v, _pow2(dv))
    out = torch.empty_like(v)
    kernel[(-(-dv // block_v) * batch * v_heads,)](
        q=q, k=k, v=v, g=g, gk=None, gv=None, beta=beta, A_log=None, dt_bias=None, o=out, h0=initial, ht=final,
        cu_seqlens=None, scale=dk**-0.5, T=steps, H=heads, HV=v_heads, K=dk, V=dv, BK=_pow2(dk), BV=block_v,
        IS_BETA_HEADWISE=True, USE_QK_L2NORM_IN_KERNEL=True, APPLY_BETA_SIGMOID=False, ALLOW_NEG_EIGVAL=False,
        STATE_V_FIRST=False, num_warps=warps, num_stages=3,
    )
    return out


# fla's (value-tile width, warps) tried per shape: fla's own choice (8, 1) reads each state row in 32-byte
# pieces with one warp per program; wider tiles read whole 128-byte lines with more warps per program.
LAUNCH_CONFIGS = ((8, 1), (16, 2), (32, 2), (32, 4), (64, 4), (64, 8))


_CONFIGS: dict[tuple, tuple[int, int]] = {}  # (configs, k shape, v shape, dtype) -> the fastest of those configs

Launch = Callable[..., torch.Tensor]  # (q, k, v, g, beta, initial, final, block_v, warps) -> output


def _launch_config(launch: Launch, configs: tuple, k_shape: tuple, v_shape: tuple, dtype: torch.dtype
                   ) -> tuple[int, int]:
    """The fastest of a kernel's `configs` for these shapes (the batch rounded up to a power of two), timed on
    first use; `configs[0]` while a CUDA graph is being captured (timing is not capturable; the engine's
    warm-up runs every shape before its capture). Each kernel has its own `configs` tuple, which keys the cache."""
    rows = _pow2(k_shape[0])  # per power-of-two batch (the graphs' buckets): calls of other sizes time nothing
    k_shape, v_shape = (rows, *k_shape[1:]), (rows, *v_shape[1:])
    key = (configs, k_shape, v_shape, dtype)
    if key not in _CONFIGS:
        if torch.cuda.is_current_stream_capturing():
            return configs[0]
        _CONFIGS[key] = _time_configs(launch, configs, k_shape, v_shape, dtype)
    return _CONFIGS[key]


def _time_configs(launch: Launch, configs: tuple, k_shape: tuple, v_shape: tuple, dtype: torch.dtype
                  ) -> tuple[int, int]:
    """Time each launch config on scratch tensors of these shapes (the decode state is a step's largest
    traffic, updated in place); the fastest wins."""
    from triton.testing import do_bench

    batch, steps, _, dk = k_shape
    q, k = (torch.randn(k_shape, device="cuda", dtype=dtype) for _ in range(2))
    v = torch.randn(v_shape, device="cuda", dtype=dtype)
    g = -torch.rand(batch, steps, v_shape[2], device="cuda")
    beta = torch.rand(batch, steps, v_shape[2], device="cuda", dtype=dtype)
    state = torch.randn(batch, v_shape[2], dk, v_shape[3], device="cuda")
    times = {config: do_bench(lambda c=config: launch(q, k, v, g, beta, state, state, *c), warmup=5, rep=20)
             for config in configs}
    return min(times, key=times.get)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _repeat_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k repeated to v's head count (grouped value attention), for the torch paths that need equal heads."""
    ratio = v.shape[2] // q.shape[2]
    return (q.repeat_interleave(ratio, dim=2), k.repeat_interleave(ratio, dim=2)) if ratio > 1 else (q, k)


def recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    steps_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-by-token rule for short inputs: q/k [B, T, H, Dk], v [B, T, HV, Dv] with HV a multiple of H
    (each key head serves HV/H value heads); updates `state` [B, HV, Dk, Dv] in place.

    `steps_out` [T, B, HV, Dk, Dv], when given, receives the state after every token
    (EAGLE verification rolls back to the last accepted one); on GPU that is one fla
    launch per token, each reading the previous token's state.
    """
    if steps_out is None and q.shape[1] == 1 and q.is_cuda:
        from pipo.engine import delta_decode  # here, not at the top: importing Triton costs ~1 s

        if delta_decode.available(q):
            config = _launch_config(delta_decode.decode_step, delta_decode.CONFIGS, tuple(k.shape), tuple(v.shape),
                                    q.dtype)
            return delta_decode.decode_step(q, k, v, g, beta, state, state, *config)
    ops = _use_fla(q)
    if ops is not None:
        if steps_out is None:
            return _fla_recurrent(ops[1], q, k, v, g, beta, state, state)
        outs = [
            _fla_recurrent(ops[1], q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1],
                           beta[:, t : t + 1], steps_out[t - 1] if t else state, steps_out[t])
            for t in range(q.shape[1])
        ]
        state.copy_(steps_out[q.shape[1] - 1])
        return torch.cat(outs, dim=1)
    dtype = q.dtype
    q, k = _repeat_heads(_l2norm(q.float()), _l2norm(k.float()), v)
    q = q * q.shape[-1] ** -0.5
    v, beta, decay = v.float(), beta.float(), g.float().exp()
    outs = []
    for t in range(q.shape[1]):
        s = state * decay[:, t, :, None, None]
        kv_mem = torch.einsum("bhk,bhkv->bhv", k[:, t], s)
        delta = (v[:, t] - kv_mem) * beta[:, t, :, None]
        s = s + k[:, t, :, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], s))
        state.copy_(s)
        if steps_out is not None:
            steps_out[t] = s
    return torch.stack(outs, dim=1).to(dtype)


def chunk_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
    offsets: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Chunked rule for long inputs (prefill), same shapes as `recurrent_delta_rule`; updates `state` in place.

    `offsets` (n + 1 host ints): the batch's one row packs n sequences end to end, sequence i at
    positions offsets[i] .. offsets[i + 1] - 1 with its state in `state[i]` (fla's variable-length
    mode: no padding is computed).
    """
    ops = _use_fla(q)
    if ops is not None:
        varlen = {}
        if offsets is not None:
            cu_seqlens, chunk_indices = _packed_indices(offsets, q.device)
            varlen = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
        out, final = ops[0](q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True,
                            use_qk_l2norm_in_kernel=True, **varlen)
        state.copy_(final)
        return out
    if offsets is None:
        return _torch_chunk(q, k, v, g, beta, state)
    pieces = [slice(a, b) for a, b in zip(offsets, offsets[1:])]
    return torch.cat([_torch_chunk(q[:, p], k[:, p], v[:, p], g[:, p], beta[:, p], state[i : i + 1])
                      for i, p in enumerate(pieces)], dim=1)


FLA_CHUNK = 64  # positions per chunk of fla's chunked rule (its default)


@functools.lru_cache(maxsize=4)
def _packed_indices(offsets: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's `cu_seqlens` (the offsets) and chunk indices, (sequence, chunk within it) per chunk [chunks, 2], of
    packed sequences on `device`: built once per prefill forward (every layer's call reuses them) and copied
    from pinned memory, where fla would copy its indices from pageable memory at every call, which waits for
    the stream."""
    pairs = [(i, c) for i, (a, b) in enumerate(zip(offsets, offsets[1:])) for c in range(-(-(b - a) // FLA_CHUNK))]
    host = (torch.tensor(offsets, dtype=torch.long), torch.tensor(pairs, dtype=torch.long))
    if device.type != "cuda":
        return host
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in host)


def _torch_chunk(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """The chunked rule in torch (CPU), batch rows each with their state row; updates `state` in place."""
    from pipo.model.linear_attention import torch_gated_delta_rule

    q, k = _repeat_heads(q, k, v)
    out, final = torch_gated_delta_rule()(
        q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    state.copy_(final)
    return out
