"""PIPO's inference engine: regular / pipo / mtp / eagle decoding over paged KV memory with continuous batching,
preemption, prompt blocks shared by samples, a block prefix cache, chunked prefill, per-sequence seeded sampling,
a request API for serving, CUDA graphs on GPU; the same code on CPU.

The names below load on first access (PEP 562): `pipo generate --help` and `METHODS` need no torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipo.engine.blocks import BlockPool, PrefixCache
    from pipo.engine.engine import Engine, Update, open_engine
    from pipo.engine.parts import build_native_mtp, load_regular
    from pipo.engine.sequence import Completion, RequestStats
    from pipo.model.sampling import speculative_accept

METHODS = ("regular", "pipo", "mtp", "eagle")

# public name -> the submodule that defines it
_SOURCES = {
    "BlockPool": "pipo.engine.blocks",
    "Completion": "pipo.engine.sequence",
    "Engine": "pipo.engine.engine",
    "PrefixCache": "pipo.engine.blocks",
    "Update": "pipo.engine.engine",
    "RequestStats": "pipo.engine.sequence",
    "build_native_mtp": "pipo.engine.parts",
    "load_regular": "pipo.engine.parts",
    "open_engine": "pipo.engine.engine",
    "speculative_accept": "pipo.model.sampling",
}
__all__ = ["METHODS", *sorted(_SOURCES)]


def __getattr__(name: str) -> Any:
    if name in _SOURCES:
        value = getattr(importlib.import_module(_SOURCES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipo.engine' has no attribute {name!r}")
