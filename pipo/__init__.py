"""PIPO (Pair-In / Pair-Out): latent multi-token prediction, its training, inference engine and pipeline.

Importing `pipo` is cheap (no torch, no transformers): `PIPOConfig` and `PIPOForCausalLM`
load on first access, and transformers' Auto classes learn `model_type: pipo` when
transformers loads them (`pipo._auto`), so a saved PIPO checkpoint loads with
`AutoModelForCausalLM.from_pretrained` after a plain `import pipo`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipo import _auto

if TYPE_CHECKING:
    from pipo.model import PIPOConfig, PIPOForCausalLM

__all__ = ["PIPOConfig", "PIPOForCausalLM"]
__version__ = "0.1.0"

_auto.install()


def __getattr__(name: str) -> Any:
    """PEP 562: the model classes are imported on first access (which also registers them)."""
    if name in __all__:
        value = getattr(importlib.import_module("pipo.model"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipo' has no attribute {name!r}")
