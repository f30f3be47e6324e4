"""A decoder stack run layer by layer against paged KV pools and slot-indexed linear states.

The engine cannot use Hugging Face's `DynamicCache`: continuous batching needs one
state row per running sequence, CUDA graphs need fixed addresses, and EAGLE verification
must roll linear-attention states back to any accepted prefix. So this module reuses the
HF modules' weights and submodules (norms, output projections; the input projections of one
input as one GEMM over their fused weight where `fuse_weights` allows) but writes its own
attention and gated-delta-rule steps against preallocated buffers:

- full attention: K/V pools `[num_blocks, kv_heads, block_size, head_dim]`; position p of the
  sequence in slot s lives in block `tables[s, p // block_size]` at offset `p % block_size`
  (`tables` is the engine's block-table tensor, shared by every stack);
- Qwen3.5 linear attention: per slot, the last `kernel - 1` conv inputs `[kernel - 1, channels]` (channels
  contiguous, so a decode step's window, conv and state update read and write whole rows) and the fp32
  recurrent state.

Rows of a decode step are a contiguous range of slots (`rows: slice`), so every
buffer access is a view and a decode step over slots `[0, B)` can be graph-captured;
mtp and eagle's first-token calls over slots that are not contiguous name them by an index
tensor (run eagerly). A batched prefill names its rows by an index tensor and packs its
prompts' chunks end to end in one batch row (`Spans`), so no padding is computed: the conv reads each sequence's history
through gathered indices (`conv_indices`), the chunked delta rule runs fla's variable-length mode,
and attention runs sequence by sequence without a mask (`prefill_attention`), so on CUDA SDPA can
pick the flash or memory-efficient kernel and only one sequence's keys are gathered at a time.
"""
from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from pipo.engine import kernels
from pipo.engine.graphs import capturing


def kernel_module(name: str):
    """A Triton kernel module of `pipo.engine` (`flash_decode`, `conv_decode`), imported on first use on a CUDA
    tensor: importing Triton costs ~1 s."""
    return importlib.import_module(f"pipo.engine.{name}")


@dataclass
class LayerState:
    """One layer's buffers: `k`/`v` block pools for full attention, per-slot `conv`/`rec` for linear attention."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    conv: torch.Tensor | None = None
    rec: torch.Tensor | None = None
    step_conv: torch.Tensor | None = None  # [steps, slots, K-1, C]: per-token states of the last forward
    step_rec: torch.Tensor | None = None  # [steps, slots, HV, Dk, Dv]


class Spans(NamedTuple):
    """The sequences of a prefill forward, packed end to end in one batch row: sequence i (prefill row i)
    holds its positions from `starts[i]` on at packed offsets `offsets[i] .. offsets[i + 1] - 1` (at least
    one each).

    `starts` and `offsets` are host ints (the scheduler built the chunks), so the per-sequence
    attention shapes cost no device-to-host sync; `cu_seqlens` is `offsets` on the device and
    `sequence` [N] the sequence of each packed token (its block table and conv history).
    """

    starts: tuple[int, ...]
    offsets: tuple[int, ...]
    cu_seqlens: torch.Tensor
    sequence: torch.Tensor


def conv_indices(spans: Spans, history: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a packed prefill's causal conv reads, as rows of [the n sequences' conv histories, `history` rows
    each; then the N packed inputs]: each input's window [N, history + 1] (oldest first) and each sequence's
    new history, its last `history` rows [n, history]."""
    n, device = len(spans.starts), spans.sequence.device
    cu, seq = spans.cu_seqlens, spans.sequence

    def rows(s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # u: place in sequence s's history + inputs
        return torch.where(u >= history, n * history + cu[s] + u - history, s * history + u)

    local = torch.arange(seq.shape[0], device=device) - cu[seq]
    taps = rows(seq[:, None], local[:, None] + torch.arange(history + 1, device=device))
    counts = (cu[1:] - cu[:-1])[:, None]
    kept = rows(torch.arange(n, device=device)[:, None], counts + torch.arange(history, device=device))
    return taps, kept


def _is_linear(layer: nn.Module) -> bool:
    return hasattr(layer, "linear_attn")


def _rotary_fn(attn: nn.Module):
    """The layer family's own `apply_rotary_pos_emb` (Qwen3.5's rotates only part of each head)."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


class LayerWeights(NamedTuple):
    """A layer's projections that read one input, each group as one weight whose rows the modules' weights
    are views of (`fuse_projections`); None where a group is not fused."""

    inputs: torch.Tensor | None = None  # q|k|v (attention) or qkv|z|b|a (linear attention)
    mlp: torch.Tensor | None = None  # gate|up


def input_projections(layer: nn.Module) -> list[nn.Module]:
    """The projections of the layer's normed input, in the order `attention_inputs` / `linear_inputs` use."""
    if _is_linear(layer):
        mod = layer.linear_attn
        return [mod.in_proj_qkv, mod.in_proj_z, mod.in_proj_b, mod.in_proj_a]
    attn = layer.self_attn
    return [attn.q_proj, attn.k_proj, attn.v_proj]


def mlp_projections(layer: nn.Module) -> list[nn.Module]:
    """A gated MLP's gate and up projections (empty for another kind of MLP)."""
    mlp = layer.mlp
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    return [mlp.gate_proj, mlp.up_proj] if all(hasattr(mlp, name) for name in names) else []


def fuse_weights(modules: list[nn.Module]) -> torch.Tensor | None:
    """One weight [sum of N, K] for the projections `modules` of one input, each module's weight a view of its
    rows, so that in-place updates of either are seen by both; None (nothing changed) when they cannot be fused.

    Why: at 256 rows a decode step's small projections run far below the GEMM's peak (an H200, Qwen3.5-4B
    shapes: linear attention's four input projections 37 us apart, 25 us as one; attention's q, k, v 31 us
    apart, 22 us as one). Weights already fused (by an earlier engine over the same model) are reused. Only
    plain bias-free `nn.Linear` modules without hooks whose weights own their memory are fused: not a PEFT
    LoRA layer, a weight tied to another, or one inside a trainer's flat buffer (DeepSpeed ZeRO, FSDP), whose
    updates would no longer reach the module.
    """
    weights = [m.weight for m in modules]
    if len(modules) < 2 or len({id(w) for w in weights}) < len(weights) or not all(map(_plain_linear, modules)):
        return None
    fused = _fused_view(weights)
    if fused is not None:
        return fused
    if not all(_owns_memory(w) for w in weights):
        return None
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, even when the engine is built in inference mode
        fused = torch.cat([w.detach() for w in weights])
    start = 0
    for w in weights:
        w.data = fused[start : start + w.shape[0]]
        start += w.shape[0]
    return fused


def _plain_linear(module: nn.Module) -> bool:
    """An `nn.Linear` (not a subclass or wrapper) without bias or hooks: its output is `F.linear(x, weight)`."""
    return (type(module) is nn.Linear and module.bias is None and not module._forward_hooks
            and not module._forward_pre_hooks)


def _owns_memory(weight: torch.Tensor) -> bool:
    """Whether `weight` is the whole of its storage (a view into a larger buffer belongs to someone else)."""
    return weight.storage_offset() == 0 and weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()


def _fused_view(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The fused weight that `weights` are consecutive rows of, covering its whole storage (what `fuse_weights`
    made), rebuilt as a view of that storage; None when they are not. Nothing holds fused weights but the
    modules' own views: a model moved or reloaded leaves no stale copy behind."""
    first = weights[0]
    storage, offset = first.untyped_storage(), 0
    for w in weights:
        if (w.untyped_storage().data_ptr() != storage.data_ptr() or w.storage_offset() != offset
                or not w.is_contiguous() or w.shape[1:] != first.shape[1:] or w.dtype != first.dtype):
            return None
        offset += w.numel()
    if offset * first.element_size() != storage.nbytes():
        return None
    rows = sum(w.shape[0] for w in weights)
    return first.new_empty(0).set_(storage, 0, (rows, *first.shape[1:]))


def fuse_projections(layer: nn.Module) -> LayerWeights:
    """The layer's fused projection weights (its input projections; the MLP's gate and up when the MLP's forward
    is the plain gated form `down(act(gate) * up)` that `_mlp_block` computes)."""
    mlp = layer.mlp
    gated = not mlp._forward_hooks and not mlp._forward_pre_hooks
    return LayerWeights(fuse_weights(input_projections(layer)), fuse_weights(mlp_projections(layer)) if gated else None)


def _projections(x: torch.Tensor, modules: list[nn.Module], fused: torch.Tensor | None) -> list[torch.Tensor]:
    """Each module's output for `x`: one GEMM over their fused weight when there is one (outputs are its views)."""
    if fused is None:
        return [m(x) for m in modules]
    return F.linear(x, fused).split([m.out_features for m in modules], dim=-1)


# Pure segments of a decoder layer around its cache access. They hold every small norm,
# activation and reshape of a layer, so on GPU each is compiled once by torch.compile
# (Inductor fuses them into a few kernels; the same compiled code serves every layer of
# a kind, as modules are arguments) while cache writes and the attention or delta-rule
# kernels stay eager and capturable.
def attention_inputs(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: LayerWeights):
    """Norm, projections, q/k norms and rotary -> q [B, Hq, T, D], k and v [B, Hkv, T, D], output gate or None."""
    attn = layer.self_attn
    x = layer.input_layernorm(x)
    batch, steps, _ = x.shape
    d = attn.head_dim
    q, k, v = _projections(x, input_projections(layer), fused.inputs)
    q = q.reshape(batch, steps, -1, d)
    gate = None
    if q.shape[2] * d != attn.o_proj.in_features:  # Qwen3.5: q_proj also yields an output gate
        q, gate = q.view(batch, steps, -1, 2 * d).chunk(2, dim=-1)
        gate = gate.reshape(batch, steps, -1)
    k, v = k.reshape(batch, steps, -1, d), v.reshape(batch, steps, -1, d)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = _rotary_fn(attn)(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, v.transpose(1, 2), gate


def attention_outputs(layer: nn.Module, residual: torch.Tensor, out: torch.Tensor, gate: torch.Tensor | None,
                      fused: LayerWeights):
    """Attention output [B, Hq, T, D] -> gate, o_proj, residual, MLP block."""
    batch, _, steps, _ = out.shape
    out = out.transpose(1, 2).reshape(batch, steps, -1)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return _mlp_block(layer, residual + layer.self_attn.o_proj(out), fused)


def linear_inputs(layer: nn.Module, x: torch.Tensor, fused: LayerWeights):
    """Norm and input projections -> the conv's inputs (q, k, v channels) [B, T, C], decay g and beta [B, T, Hv]
    (fp32 g), gate z."""
    mod = layer.linear_attn
    x = layer.input_layernorm(x)
    mixed, z, b, a = _projections(x, input_projections(layer), fused.inputs)
    g = -mod.A_log.float().exp() * F.softplus(a.float() + mod.dt_bias)
    return mixed, g, b.sigmoid(), z


def linear_conv(layer: nn.Module, mixed: torch.Tensor, history: torch.Tensor):
    """The causal depthwise conv and SiLU over (cached inputs `history` [B, K-1, C] + new `mixed` [B, T, C]) ->
    q, k [B, T, Hk, Dk], v [B, T, Hv, Dv] (contiguous), conv window [B, K-1+T, C]."""
    mod = layer.linear_attn
    window = torch.cat([history, mixed.to(history.dtype)], dim=1)
    conv = F.silu(_causal_conv(window, mod.conv1d.weight, mod.conv1d.bias, mixed.shape[1]))
    return *(t.contiguous() for t in conv_heads(mod, conv)), window


def packed_conv(layer: nn.Module, mixed: torch.Tensor, history: torch.Tensor, taps: torch.Tensor,
                kept: torch.Tensor):
    """The causal depthwise conv and SiLU of a packed prefill: inputs `mixed` [1, N, C] of sequences whose conv
    histories are `history` [n, K-1, C], read through `conv_indices`' `taps` and `kept` -> q, k, v [1, N, ...]
    (contiguous), the sequences' new histories [n, K-1, C]. Eagerly one [N, C] gather per tap; torch.compile
    fuses the gathers, the sum and the SiLU into one pass."""
    mod = layer.linear_attn
    inputs = torch.cat([history.flatten(0, 1), mixed[0].to(history.dtype)])
    weight, bias = mod.conv1d.weight[:, 0], mod.conv1d.bias
    out = sum(inputs[taps[:, j]] * weight[:, j] for j in range(taps.shape[1]))
    conv = F.silu(out if bias is None else out + bias)[None]
    return *(t.contiguous() for t in conv_heads(mod, conv)), inputs[kept]


def conv_heads(mod: nn.Module, conv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The conv's output channels [B, T, C] as q, k [B, T, Hk, Dk] and v [B, T, Hv, Dv] (views)."""
    batch, steps, _ = conv.shape
    q, k, v = torch.split(conv, [mod.key_dim, mod.key_dim, mod.value_dim], dim=-1)
    return (q.view(batch, steps, -1, mod.head_k_dim), k.view(batch, steps, -1, mod.head_k_dim),
            v.view(batch, steps, -1, mod.head_v_dim))


def _causal_conv(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, steps: int) -> torch.Tensor:
    """Depthwise conv of `window` [B, K-1+T, C] with `weight` [C, 1, K] -> [B, T, C].

    A decode step's few outputs are K shifted multiply-adds, which torch.compile fuses with
    the window's concatenation and the activation; cuDNN's depthwise kernel is a separate
    launch that costs more than the whole sum at batch 256. Long inputs use conv1d.
    """
    if steps > 8:
        return F.conv1d(window.transpose(1, 2), weight, bias, groups=weight.shape[0]).transpose(1, 2)
    taps = weight.shape[-1]
    out = sum(window[:, j : j + steps] * weight[:, 0, j] for j in range(taps))
    return out if bias is None else out + bias


def linear_outputs(layer: nn.Module, residual: torch.Tensor, out: torch.Tensor, z: torch.Tensor, fused: LayerWeights):
    """Delta-rule output [B, T, Hv, Dv] -> gated norm, out_proj, residual, MLP block."""
    mod = layer.linear_attn
    batch, steps = out.shape[:2]
    out = mod.norm(out.reshape(-1, mod.head_v_dim), z.reshape(-1, mod.head_v_dim)).reshape(batch, steps, -1)
    return _mlp_block(layer, residual + mod.out_proj(out), fused)


def _mlp_block(layer: nn.Module, x: torch.Tensor, fused: LayerWeights) -> torch.Tensor:
    x_norm = layer.post_attention_layernorm(x)
    if fused.mlp is None:
        return x + layer.mlp(x_norm)
    mlp = layer.mlp
    gate, up = _projections(x_norm, mlp_projections(layer), fused.mlp)
    return x + mlp.down_proj(mlp.act_fn(gate) * up)


SEGMENTS = (attention_inputs, attention_outputs, linear_inputs, linear_conv, linear_outputs, packed_conv)


@functools.lru_cache(maxsize=2)
def compiled_segments(dynamic: bool | None = None) -> tuple:
    """`SEGMENTS` through torch.compile, built once per process (compiled code is shared by every stack).
    `dynamic=True` for prefill: one compilation serves every packed length, where shape-specialised code
    would recompile for seconds at each new prefill shape in the middle of a run."""
    return tuple(torch.compile(fn, dynamic=dynamic) for fn in SEGMENTS)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    tables: torch.Tensor,
    spans: Spans,
    scale: float,
) -> torch.Tensor:
    """Prefill attention, sequence by sequence: packed queries q [1, Hq, N, D] of new keys/values
    k, v [1, Hkv, N, D], already written to the pools at their positions through the sequences' block
    `tables` [n, max_blocks] -> [1, Hq, N, D].

    Sequence i's queries attend causally over its positions from 0 up to their own:
    a chunk that starts its sequence needs only its own keys; a later chunk (or a prompt after a
    cached prefix) reads its earlier keys from its blocks, one sequence's at a time.
    """
    out = torch.empty_like(q)
    for i, (start, lo, hi) in enumerate(zip(spans.starts, spans.offsets, spans.offsets[1:])):
        new = slice(lo, hi)
        if start == 0:
            keys, values = k[0, :, new], v[0, :, new]
        else:
            keys, values = (_row_cache(pool, tables[i], start + hi - lo) for pool in (pool_k, pool_v))
        out[0, :, new] = causal_attention(q[0, :, new], keys, values, scale)
        del keys, values  # one sequence's gathered keys at a time
    return out


def _row_cache(pool: torch.Tensor, table: torch.Tensor, end: int) -> torch.Tensor:
    """Positions 0..end-1 of one row's cache from `pool` [blocks, Hkv, block_size, D] through its `table` ->
    [Hkv, end, D]."""
    kv_heads, bs, d = pool.shape[1:]
    return pool[table[: -(-end // bs)]].transpose(0, 1).reshape(kv_heads, -1, d)[:, :end]


# SDPA's backends for prefill rows, cuDNN's left out: it builds an execution plan for every new query length,
# ~10 ms of host time per call on an H200 (240 of a 414-ms serving prefill forward), and rows come in every length
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Queries q [Hq, n, D] at the last n of the L positions of k, v [Hkv, L, D] (Hkv divides Hq) -> [Hq, n, D]:
    query j sees keys 0 .. L - n + j. No mask tensor, so on CUDA SDPA uses the flash or memory-efficient kernel.
    """
    heads, n, d = q.shape
    kv_heads, length = k.shape[:2]
    if n == length:
        with sdpa_kernel(PREFILL_BACKENDS):
            return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                                  enable_gqa=True)[0]
    # `causal_lower_right` calls the flash or memory-efficient kernel itself, past SDPA's handling of fewer K/V
    # heads: each KV head's query group becomes a batch row over that head's K/V, expanded (a view, not a copy)
    group = heads // kv_heads
    out = F.scaled_dot_product_attention(
        q.view(kv_heads, group, n, d), k[:, None].expand(-1, group, -1, -1), v[:, None].expand(-1, group, -1, -1),
        attn_mask=causal_lower_right(n, length), scale=scale,
    )
    return out.reshape(heads, n, d)


def kv_bytes_per_block(layers, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over the full-attention layers of `layers` (K and V)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(2 * block_size * layer.self_attn.k_proj.out_features * size for layer in layers if not _is_linear(layer))


class PagedStack:
    """Decoder layers + final norm of one model part (the backbone, or the one-layer MTP head).

    `tables` [slots, max_blocks] maps each slot's positions to pool blocks; `compile` runs the
    layers' pure segments through torch.compile inside CUDA-graph captures (`graphs.capturing`);
    `record_steps` keeps per-token linear-attention states for rollback (`commit`); `fuse` runs each layer's
    projections of one input as one GEMM (`fuse_projections`: the modules' weights become views of it).
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        norm: nn.Module,
        rotary: nn.Module,
        slots: int,
        tables: torch.Tensor,
        num_blocks: int,
        block_size: int,
        record_steps: int = 0,
        compile: bool = False,
        fuse: bool = False,
    ) -> None:
        self.layers = list(layers)
        self.norm = norm
        self.rotary = rotary
        self.tables = tables
        self.block_size = block_size
        self.record_steps = record_steps
        self.segments = compiled_segments() if compile else SEGMENTS
        self.prefill_segments = compiled_segments(dynamic=True) if compile else SEGMENTS
        self.weights = [fuse_projections(layer) if fuse else LayerWeights() for layer in self.layers]
        self.states = [self._allocate(layer, slots, num_blocks) for layer in self.layers]

    def _allocate(self, layer: nn.Module, slots: int, num_blocks: int) -> LayerState:
        weight = next(layer.parameters())
        dtype, device = weight.dtype, weight.device
        if _is_linear(layer):
            mod = layer.linear_attn
            conv = torch.zeros(slots, mod.conv_kernel_size - 1, mod.conv_dim, dtype=dtype, device=device)
            rec = torch.zeros(slots, mod.num_v_heads, mod.head_k_dim, mod.head_v_dim, dtype=torch.float32, device=device)
            state = LayerState(conv=conv, rec=rec)
            if self.record_steps:  # step-major, so that one step's states of a row range are contiguous
                state.step_conv = torch.zeros(self.record_steps, *conv.shape, dtype=dtype, device=device)
                state.step_rec = torch.zeros(self.record_steps, *rec.shape, dtype=torch.float32, device=device)
            return state
        attn = layer.self_attn
        shape = (num_blocks, attn.k_proj.out_features // attn.head_dim, self.block_size, attn.head_dim)
        return LayerState(k=torch.zeros(shape, dtype=dtype, device=device), v=torch.zeros(shape, dtype=dtype, device=device))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        rows: slice | torch.Tensor,
        positions: torch.Tensor,
        kv_len: int | None = None,
        record: bool = False,
        prefill: Spans | None = None,
    ) -> torch.Tensor:
        """Input embeddings `x` [B, T, H] at `positions` [B, T] of slots `rows` -> normed hidden [B, T, H].

        Decode steps (`prefill` None) run the gated delta rule token by token; `kv_len` bounds
        the keys attended where their batched SDPA runs (a whole number of blocks is read; the
        Triton decode kernel reads each row's filled blocks whatever it is). `record` keeps every
        token's linear-attention state so that `commit` can roll back to an accepted prefix.
        A prefill forward (`x` [1, N, H]: its sequences packed, `rows` an index tensor of their
        slots) runs the chunked delta rule and attends sequence by sequence.
        """
        kv_len = kv_len or self.tables.shape[1] * self.block_size
        if hasattr(self.rotary, "mrope_section"):  # Qwen3.5's multimodal rotary: text uses one position per axis
            cos, sin = self.rotary(x, positions[None].expand(3, -1, -1))
        else:
            cos, sin = self.rotary(x, positions)
        segments = self.segments if capturing() else self.prefill_segments if prefill is not None else SEGMENTS
        attn_in, attn_out, linear_in, linear_conv, linear_out, prefill_conv = segments
        indices = None  # the packed conv's gather indices, shared by the linear-attention layers
        for layer, state, fused in zip(self.layers, self.states, self.weights):
            if _is_linear(layer):
                mixed, g, beta, z = linear_in(layer, x, fused)
                if prefill is None:
                    q, k, v = self._conv(layer, state, mixed, rows, record, linear_conv)
                else:
                    indices = indices or conv_indices(prefill, state.conv.shape[1])
                    q, k, v, history = prefill_conv(layer, mixed, state.conv[rows], *indices)
                    state.conv[rows] = history
                out = self._delta_rule(state, q, k, v, g, beta, rows, record, prefill)
                x = linear_out(layer, x, out, z, fused)
            else:
                q, k, v, gate = attn_in(layer, x, cos, sin, fused)
                out = self._attention(layer.self_attn, state, q, k, v, rows, positions, kv_len, prefill)
                x = attn_out(layer, x, out, gate, fused)
        return self.norm(x)

    def _attention(
        self,
        attn: nn.Module,
        state: LayerState,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: slice | torch.Tensor,
        positions: torch.Tensor,
        kv_len: int,
        prefill: Spans | None = None,
    ) -> torch.Tensor:
        """Causal attention of the new tokens over the rows' paged caches (they are written first) -> [B, Hq, T, D].

        Prefill attends sequence by sequence (`prefill_attention`). Decode steps on GPU use the
        paged split-K Triton kernel; elsewhere (CPU, EAGLE's verification) they gather the rows'
        first `kv_len` positions of blocks and use one batched SDPA with a mask.
        """
        batch, _, steps, d = q.shape
        bs = self.block_size
        tables = self.tables[rows]
        if prefill is None:
            blocks = tables.gather(1, positions // bs)
        else:  # packed: each token's block from its own sequence's table
            blocks = tables[prefill.sequence, positions[0] // bs][None]
        offsets = positions % bs
        state.k[blocks, :, offsets] = k.transpose(1, 2).to(state.k.dtype)
        state.v[blocks, :, offsets] = v.transpose(1, 2).to(state.v.dtype)
        if prefill is not None:
            return prefill_attention(q, k, v, state.k, state.v, tables, prefill, attn.scaling)
        # grouped-query attention without repeating K/V: each KV head's query group becomes extra query rows
        kv_heads = state.k.shape[1]
        q = q.reshape(batch, kv_heads, -1, d)
        paged = kernel_module("flash_decode") if q.is_cuda else None
        if paged is not None and paged.available(q, bs):
            out = paged.paged_decode_attention(q, state.k, state.v, tables, positions, attn.scaling)
        else:
            used = tables[:, : -(-kv_len // bs)]
            k_cache = state.k[used].transpose(1, 2).reshape(batch, kv_heads, -1, d)
            v_cache = state.v[used].transpose(1, 2).reshape(batch, kv_heads, -1, d)
            mask = torch.arange(k_cache.shape[2], device=q.device)[None, None, :] <= positions[:, :, None]
            out = F.scaled_dot_product_attention(
                q, k_cache, v_cache, attn_mask=mask[:, None].repeat(1, 1, q.shape[2] // steps, 1), scale=attn.scaling,
            )
        return out.reshape(batch, -1, steps, d)

    def _conv(
        self,
        layer: nn.Module,
        state: LayerState,
        mixed: torch.Tensor,
        rows: slice | torch.Tensor,
        record: bool,
        linear_conv,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A decode step's causal conv over the rows' conv history and `mixed` [B, T, C] -> q, k, v; keeps the
        history (per token when recording). A row range on GPU runs one Triton kernel that updates the
        history in place (`conv_decode`); the rest the torch segment `linear_conv` and writes the history."""
        mod = layer.linear_attn
        kernel = kernel_module("conv_decode") if mixed.is_cuda and not record else None
        if kernel is not None and isinstance(rows, slice) and kernel.available(mixed):
            conv = kernel.conv_step(mixed, state.conv[rows], mod.conv1d.weight, mod.conv1d.bias)
            return conv_heads(mod, conv)
        q, k, v, window = linear_conv(layer, mixed, state.conv[rows])
        steps, history = mixed.shape[1], state.conv.shape[1]
        if record:  # the conv history after token t is window[:, t + 1 : t + 1 + history]
            state.step_conv[:steps, rows] = window.unfold(1, history, 1)[:, 1:].permute(1, 0, 3, 2)
        state.conv[rows] = window[:, -history:]
        return q, k, v

    def _delta_rule(
        self,
        state: LayerState,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        rows: slice | torch.Tensor,
        record: bool,
        prefill: Spans | None,
    ) -> torch.Tensor:
        """The gated delta rule on the rows' states: token by token in decode steps (per token when recording),
        chunked over a prefill's packed sequences. An index tensor of rows gets its states gathered and
        written back."""
        steps = q.shape[1]
        rec = state.rec[rows]
        if prefill is None:
            out = kernels.recurrent_delta_rule(q, k, v, g, beta, rec, state.step_rec[:steps, rows] if record else None)
        else:
            out = kernels.chunk_delta_rule(q, k, v, g, beta, rec, prefill.offsets)
        if not isinstance(rows, slice):
            state.rec[rows] = rec
        return out

    # ------------------------------------------------------------------ slot state
    def commit(self, rows: slice, last_step: torch.Tensor) -> None:
        """After a recorded forward, keep each row's linear-attention state after token `last_step` [B]."""
        slots = torch.arange(rows.start, rows.stop, device=last_step.device)
        for state in self.states:
            if state.rec is not None:
                state.conv[rows] = state.step_conv[last_step, slots]
                state.rec[rows] = state.step_rec[last_step, slots]

    def reset(self, slot: int) -> None:
        """Forget a slot's linear-attention history (KV entries live in the sequence's own blocks)."""
        for state in self.states:
            if state.rec is not None:
                state.conv[slot].zero_()
                state.rec[slot].zero_()

    def save_linear(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Copies of a slot's linear-attention states (the part of a prompt's state that is not paged)."""
        return [(s.conv[slot].clone(), s.rec[slot].clone()) if s.rec is not None else None for s in self.states]

    def load_linear(self, slot: int, saved: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        for state, item in zip(self.states, saved):
            if item is not None:
                state.conv[slot].copy_(item[0])
                state.rec[slot].copy_(item[1])

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one pool block into another in every full-attention layer (copy-on-write of a partial block)."""
        for state in self.states:
            if state.k is not None:
                state.k[dst].copy_(state.k[src])
                state.v[dst].copy_(state.v[src])
