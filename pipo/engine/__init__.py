"""PIPO's inference engine: regular / pipo / mtp / eagle decoding over paged KV memory with continuous batching,
preemption, prompt blocks shared by samples, a block prefix cache, chunked prefill, per-sequence seeded sampling,
a request API for serving, CUDA graphs on GPU; the same code on CPU.

The names below load on first access (PEP 562): `pipo generate --help` and `METHODS` need no torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipo.lazy import lazy_getattr

if TYPE_CHECKING:
    from pipo.engine.blocks import BlockPool, PrefixCache
    from pipo.engine.engine import Engine, Update, open_engine
    from pipo.engine.parts import build_native_mtp, load_regular
    from pipo.engine.sequence import Completion, RequestStats
    from pipo.model.sampling import speculative_accept

METHODS = ("regular", "pipo", "mtp", "eagle")


def prompt_positions(tokens: int, method: str) -> int:
    """Positions a prompt of `tokens` tokens takes out of `max_seq_len`: PIPO pads an odd prompt to whole pairs."""
    return tokens + tokens % 2 if method == "pipo" else tokens


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
__all__ = ["METHODS", "prompt_positions", *sorted(_SOURCES)]

__getattr__ = lazy_getattr(__name__, _SOURCES)
