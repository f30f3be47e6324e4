"""Names a package loads on first access (PEP 562), so importing the package stays cheap.

`pipo`, `pipo.model` and `pipo.engine` list their public names with the submodule that
defines each; `pipo generate --help` or `import pipo` then need neither torch nor transformers.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, sources: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports `sources[name]` on first access and keeps the value."""

    def __getattr__(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(sources[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
