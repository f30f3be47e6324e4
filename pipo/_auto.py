"""`model_type: pipo` in transformers' Auto classes, without importing transformers (or torch) to say so.

transformers' public `AutoConfig.register` / `AutoModelForCausalLM.register` take the classes
themselves, and building `PIPOForCausalLM` costs seconds of torch and transformers imports. So
`import pipo` only installs a finder that waits for transformers' own auto modules to load and
then adds `pipo` the way transformers lists its built-in models: by name (`CONFIG_MAPPING_NAMES`,
`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), with `pipo.model` (a lazy package) as the module those names
resolve in. The classes are imported on the first lookup, e.g. by
`AutoModelForCausalLM.from_pretrained(pipo_checkpoint)`; importing `pipo.model.modeling` also
registers them through the public API (`register_auto_classes`). Nothing here imports anything
while transformers is mid-import, so a partly initialised transformers module is never touched.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType

MODEL_TYPE = "pipo"
CONFIG_CLASS = "PIPOConfig"
MODEL_CLASS = "PIPOForCausalLM"
_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"


def _classes_module() -> ModuleType:
    """The module the names resolve in; `pipo.model` imports its classes on first attribute access."""
    return importlib.import_module("pipo.model")


def add_config_name(configuration_auto: ModuleType) -> None:
    """`AutoConfig` resolves `model_type: pipo` to `pipo.model.PIPOConfig`, imported on first use."""
    configuration_auto.CONFIG_MAPPING_NAMES.setdefault(MODEL_TYPE, CONFIG_CLASS)
    configuration_auto.CONFIG_MAPPING._modules.setdefault(MODEL_TYPE, _classes_module())


def add_model_name(modeling_auto: ModuleType) -> None:
    """`AutoModelForCausalLM` resolves a `PIPOConfig` to `pipo.model.PIPOForCausalLM`, imported on first use."""
    mapping = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING
    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(MODEL_TYPE, MODEL_CLASS)
    mapping._reverse_config_mapping.setdefault(CONFIG_CLASS, MODEL_TYPE)
    mapping._modules.setdefault(MODEL_TYPE, _classes_module())


_ADD: dict[str, Callable[[ModuleType], None]] = {_CONFIG_AUTO: add_config_name, _MODELING_AUTO: add_model_name}


class _RunAfter(importlib.abc.Loader):
    """Delegates to the module's own loader, then calls `after(module)`."""

    def __init__(self, loader: importlib.abc.Loader, after: Callable[[ModuleType], None]) -> None:
        self.loader, self.after = loader, after

    def create_module(self, spec):  # noqa: ANN001, ANN201 (importlib protocol)
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.after(module)

    def __getattr__(self, name: str):  # noqa: ANN204 (get_source, get_resource_reader, ...)
        return getattr(self.loader, name)


class _AutoModulesFinder(importlib.abc.MetaPathFinder):
    """Finds transformers' auto modules with the other finders and wraps their loaders."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 (importlib protocol)
        if name not in _ADD:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RunAfter(spec.loader, _ADD[name])
                return spec
        return None


def install() -> None:
    """Add `pipo` to the auto modules already imported, and to those imported later (idempotent)."""
    for name, add in _ADD.items():
        if name in sys.modules:
            add(sys.modules[name])
    if not any(isinstance(finder, _AutoModulesFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoModulesFinder())
