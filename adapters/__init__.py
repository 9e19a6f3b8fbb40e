"""adapters: fine-tune quantized pre-trained models with strategies from plugins, and compare them.

The public API::

    import adapters

    base = adapters.load_base_model("smollm2-135m", quantization="nf4")
    strategy = adapters.get_strategy("lora")
    result = adapters.train(adapters.TrainSettings(strategy="qlora", max_steps=10, output="out"))
    restored = adapters.load("out")

Plugins implement hooks from `adapters.hookspecs` with the `adapters.hookimpl` marker.
"""
from .errors import AdaptersError, TrainingFailed, UnknownStrategyError
from .hookspecs import hookimpl
from .models import BaseModel, fingerprint, load_base_model
from .peft_io import load_peft, save_peft
from .plan import ModelShape, RunShape, StrategyMemory
from .plugins import get_plugin_manager, get_registry
from .store import Loaded, load, read_safetensors, save
from .strategy import (
    QUANTIZATIONS,
    TASKS,
    ParameterCount,
    Strategy,
    count_parameters,
    freeze,
    linear_module_names,
    output_head_name,
    task_of,
    trainable_parameters,
)
from .train import TrainResult, TrainSettings, train

__all__ = [
    "AdaptersError", "TrainingFailed", "UnknownStrategyError", "hookimpl", "BaseModel", "fingerprint",
    "load_base_model", "load_peft", "save_peft", "get_plugin_manager", "get_registry", "get_strategy", "Loaded",
    "load", "read_safetensors", "save", "QUANTIZATIONS", "TASKS", "ParameterCount", "Strategy",
    "count_parameters", "freeze", "linear_module_names", "output_head_name", "task_of", "trainable_parameters",
    "TrainResult", "TrainSettings", "train", "ModelShape", "RunShape", "StrategyMemory",
]


def get_strategy(name: str) -> Strategy:
    """The registered strategy called ``name``; raises `UnknownStrategyError` with suggestions."""
    return get_registry().get(name)
