"""The PIPO architecture: config, compressor, MTP and confidence heads, `PIPOForCausalLM`, losses, the pair
layout (`pairs`), reference generators, tiny random backbones (`tiny`).

The names below load on first access (PEP 562), so `pipo.model.sampling` and the other
submodules import without pulling in transformers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipo.lazy import lazy_getattr

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

__getattr__ = lazy_getattr(__name__, _SOURCES)
