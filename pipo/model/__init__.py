"""The PIPO architecture: config, compressor, MTP and confidence heads, `PIPOForCausalLM`, reference generators.

The names below load on first access (PEP 562), so `pipo.model.sampling` and the other
submodules import without pulling in transformers.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipo.model.config import PIPOConfig
    from pipo.model.modeling import PIPOCache, PIPOForCausalLM, PIPOOutput, is_pipo_checkpoint, register_auto_classes

# public name -> the submodule that defines it
_SOURCES = {
    "PIPOConfig": "pipo.model.config",
    "PIPOCache": "pipo.model.modeling",
    "PIPOForCausalLM": "pipo.model.modeling",
    "PIPOOutput": "pipo.model.modeling",
    "is_pipo_checkpoint": "pipo.model.modeling",
    "register_auto_classes": "pipo.model.modeling",
}
__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name in _SOURCES:
        value = getattr(importlib.import_module(_SOURCES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipo.model' has no attribute {name!r}")
