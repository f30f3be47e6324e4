"""Which gated-delta-rule implementation Qwen3.5's linear-attention layers train with.

transformers binds `modeling_qwen3_5.torch_chunk_gated_delta_rule` at import time to
flash-linear-attention's `chunk_gated_delta_rule` when fla imports, and every
`Qwen3_5GatedDeltaNet.forward` calls that module global. fla 0.6.0 refuses the backward
of that op on Hopper with Triton >= 3.4.0 and < 3.7.1 (Triton miscompiles the gated
`chunk_bwd_dqkwg` kernel, fla issue #640) unless its TileLang backend can take that kernel
over. torch 2.11 pins Triton 3.6, so on H100/H200 with the usual stack training stopped at
the first backward pass.

`select_gated_delta_backend` decides from plain facts (versions, compute capability,
TileLang usable), so it is testable on a CPU; `route_gated_delta_rule` gathers the facts
and, when the decision is the PyTorch path, rebinds the module global to a router that
sends calls needing gradients to transformers' reference implementation and keeps fla
for everything else (inference, teacher forwards, rollouts): only the backward is broken.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from packaging.version import Version

from pipo.errors import PIPOError

FLA = "fla"  # fla's Triton kernels, forward and backward
FLA_TILELANG = "fla-tilelang"  # fla, with TileLang taking over the gated backward kernel
TORCH = "torch"  # no usable fla: transformers runs its PyTorch reference path everywhere (and warns itself)
TORCH_FOR_GRADIENTS = "torch-for-gradients"  # fla forward-only; calls that need gradients take the PyTorch path
BAD_TRITON = (Version("3.4.0"), Version("3.7.1"))  # [low, high): fla #640 on Hopper
FLA_WITH_TILELANG = Version("0.6.0")  # first fla release with the TileLang backend for that kernel
SPEEDUP_HINT = "for fla's fast backward install tilelang (with a CUDA toolkit's nvcc) or move to Triton >= 3.7.1"


@dataclass(frozen=True)
class GatedDeltaBackend:
    """The implementation that training's gated delta rule runs on, and why."""

    name: str  # FLA | FLA_TILELANG | TORCH | TORCH_FOR_GRADIENTS
    reason: str


def select_gated_delta_backend(
    fla_version: str | None,
    triton_version: str | None,
    capability: tuple[int, int] | None,
    tilelang_usable: bool,
) -> GatedDeltaBackend:
    """Pick the training backend from installed versions, the GPU's compute capability (None: no GPU)
    and whether fla's TileLang backend can run (package installed, nvcc found, not disabled)."""
    if capability is None:
        return GatedDeltaBackend(TORCH, "no CUDA device: fla's kernels are Triton GPU kernels")
    if fla_version is None:
        return GatedDeltaBackend(TORCH, "flash-linear-attention is not installed (pip install 'flash-linear-attention>=0.6')")
    if triton_version is None:
        return GatedDeltaBackend(TORCH, "Triton is not installed, which fla's kernels need")
    triton = Version(triton_version)
    if capability[0] != 9 or not BAD_TRITON[0] <= triton < BAD_TRITON[1]:
        return GatedDeltaBackend(FLA, f"flash-linear-attention {fla_version} with Triton {triton_version}")
    broken = (
        f"Triton {triton_version} on a Hopper GPU (sm_{capability[0]}{capability[1]}) miscompiles fla's gated "
        f"chunk_bwd_dqkwg backward (fla #640; fla {fla_version} refuses it)"
    )
    if tilelang_usable and Version(fla_version) >= FLA_WITH_TILELANG:
        return GatedDeltaBackend(FLA_TILELANG, f"{broken}; fla's TileLang backend runs that kernel")
    return GatedDeltaBackend(
        TORCH_FOR_GRADIENTS, f"{broken} and TileLang is not usable: the gated delta rule trains on transformers' PyTorch path "
        f"(correct, slower); {SPEEDUP_HINT}"
    )


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tilelang_usable() -> bool:
    """fla's own test (`TileLangBackend.can_use`): tilelang importable, an nvcc on hand, FLA_TILELANG not 0."""
    if importlib.util.find_spec("tilelang") is None or os.environ.get("FLA_TILELANG") == "0":
        return False
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or (Path(cuda_home) / "bin" / "nvcc").exists()


def current_gated_delta_backend() -> GatedDeltaBackend:
    """`select_gated_delta_backend` on this process's packages and first GPU."""
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    return select_gated_delta_backend(
        _version("flash-linear-attention") or _version("fla-core"), _version("triton"), capability, _tilelang_usable()
    )


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gradient_router(fast, reference):
    """`fast` for calls no gradient flows through, `reference` for the rest (same signature as transformers')."""

    def chunk_gated_delta_rule(query, key, value, g, beta, *args, **kwargs):
        if not _needs_grad(query, key, value, g, beta):
            return fast(query, key, value, g, beta, *args, **kwargs)
        if kwargs.get("cu_seqlens") is not None:
            raise PIPOError("packed sequences (cu_seqlens) need fla's gated-delta-rule backward, which is unusable here")
        return reference(query, key, value, g, beta, *args, **kwargs)

    chunk_gated_delta_rule.pipo_routed = True
    chunk_gated_delta_rule.reference = reference
    return chunk_gated_delta_rule


def torch_gated_delta_rule():
    """transformers' PyTorch chunked gated delta rule itself, for tensors Triton cannot take (CPU).

    The module global may be transformers' hub-kernel wrapper (it calls fla whenever fla imports, whatever
    the tensors' device) or our router over it; underneath both sits the plain PyTorch function.
    """
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen3_5

    current = qwen3_5.torch_chunk_gated_delta_rule
    return inspect.unwrap(getattr(current, "reference", current))


def route_gated_delta_rule() -> GatedDeltaBackend:
    """Make Qwen3.5's linear-attention layers train on a correct gated delta rule; returns the choice.

    Idempotent; warns once, naming the cause and what to install, when it routes away from fla.
    """
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen3_5

    backend = current_gated_delta_backend()
    current = qwen3_5.torch_chunk_gated_delta_rule
    if backend.name != TORCH_FOR_GRADIENTS or getattr(current, "pipo_routed", False):
        return backend
    # transformers' own torch function sits under its fla wrapper (functools.wraps keeps it as __wrapped__)
    qwen3_5.torch_chunk_gated_delta_rule = gradient_router(current, inspect.unwrap(current))
    warnings.warn(f"PIPO training: {backend.reason}", stacklevel=2)
    return backend
