"""adapters: fine-tune quantized pre-trained models with strategies from plugins, and compare them.

The public API::

    import adapters

    base = adapters.load_base_model("smollm2-135m", quantization="nf4")
    strategy = adapters.get_strategy("lora")
    result = adapters.train(adapters.RunSpec(strategy="qlora", max_steps=10, output="out"))
    restored = adapters.load("out")

Plugins implement hooks from `adapters.host.hookspecs` with the `adapters.hookimpl` marker, and write
strategies against `adapters.contract` (docs/plugins.md).

Every name here is imported on first use: ``import adapters`` imports neither torch nor
transformers, so commands that need no model start fast.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# The distribution that ships this package (PyPI's `adapters` is AdapterHub's library); the
# `adapters` command checks it to tell the two apart.
__distribution__ = "adapters-lab"

# name -> the module that defines it
_EXPORTS = {
    "errors": ("AdaptersError", "TrainingFailed", "UnknownStrategyError", "NothingKept", "OtherBase",
               "OutOfMemoryBackoff", "TokenizerFallback"),
    "host": ("hookimpl", "get_plugin_manager", "get_registry"),
    "contract": ("QUANTIZATIONS", "TASKS", "Strategy", "StrategyBase", "Traits", "traits", "SavesOwnFormat",
                 "DeclaresTrainable", "EstimatesMemory", "RefusesModels", "RefusesRuns", "GroupsParameters",
                 "InitialisesFromData", "Merges", "ImportsPeft",
                 "ModelShape", "LinearShape", "RunShape",
                 "StrategyMemory"),
    "nn": ("ParameterCount", "count_parameters", "freeze", "linear_module_names", "output_head_name", "task_of",
           "trainable_parameters", "match_targets", "targeted_linears", "head_parameters", "is_linear",
           "linear_features"),
    "peft": ("PeftStrategy", "load_peft", "save_peft", "peft_task_type", "PeftMethod", "PeftOption", "peft_methods",
             "PEFT_TASK_TYPES"),
    "runspec": ("RunSpec", "TrainSettings", "StrategyRefused"),
    "resolver": ("resolve",),
    "loading": ("BaseModel", "fingerprint", "load_base_model"),
    "store": ("Loaded", "load", "save"),
    "tensorfiles": ("read_safetensors",),
    "training": ("TrainResult", "train"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted([*_WHERE, "get_strategy"])


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:  # a submodule, as `adapters.models` was reachable after `import adapters` in 0.1
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'adapters' has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


def get_strategy(name: str) -> Strategy:
    """The registered strategy called ``name``; raises `UnknownStrategyError` with suggestions."""
    from .host import get_registry

    return get_registry().get(name)


if TYPE_CHECKING:  # for type checkers and editors: the names above, imported eagerly
    from .contract import (  # noqa: F401
        QUANTIZATIONS,
        TASKS,
        DeclaresTrainable,
        EstimatesMemory,
        GroupsParameters,
        ImportsPeft,
        InitialisesFromData,
        LinearShape,
        Merges,
        ModelShape,
        RefusesModels,
        RefusesRuns,
        RunShape,
        SavesOwnFormat,
        Strategy,
        StrategyBase,
        StrategyMemory,
        Traits,
        traits,
    )
    from .errors import (  # noqa: F401
        AdaptersError,
        NothingKept,
        OtherBase,
        OutOfMemoryBackoff,
        TokenizerFallback,
        TrainingFailed,
        UnknownStrategyError,
    )
    from .host import get_plugin_manager, get_registry, hookimpl  # noqa: F401
    from .loading import BaseModel, fingerprint, load_base_model  # noqa: F401
    from .nn import (  # noqa: F401
        ParameterCount,
        count_parameters,
        freeze,
        head_parameters,
        is_linear,
        linear_features,
        linear_module_names,
        match_targets,
        output_head_name,
        targeted_linears,
        task_of,
        trainable_parameters,
    )
    from .peft import (  # noqa: F401
        PEFT_TASK_TYPES,
        PeftMethod,
        PeftOption,
        PeftStrategy,
        load_peft,
        peft_methods,
        peft_task_type,
        save_peft,
    )
    from .resolver import resolve  # noqa: F401
    from .runspec import RunSpec, StrategyRefused, TrainSettings  # noqa: F401
    from .store import Loaded, load, save  # noqa: F401
    from .tensorfiles import read_safetensors  # noqa: F401
    from .training import TrainResult, train  # noqa: F401
