"""PIPO (Pair-In / Pair-Out): latent multi-token prediction, its training, inference engine and pipeline.

Importing `pipo` is cheap (no torch, no transformers): `PIPOConfig` and `PIPOForCausalLM`
load on first access, and transformers' Auto classes learn `model_type: pipo` when
transformers loads them (`pipo._auto`), so a saved PIPO checkpoint loads with
`AutoModelForCausalLM.from_pretrained` after a plain `import pipo`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipo import _auto
from pipo.lazy import lazy_getattr

if TYPE_CHECKING:
    from pipo.model import PIPOConfig, PIPOForCausalLM

__all__ = ["PIPOConfig", "PIPOForCausalLM"]
__version__ = "0.1.0"

_auto.install()

__getattr__ = lazy_getattr(__name__, dict.fromkeys(__all__, "pipo.model"))
