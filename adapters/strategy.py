"""The strategy contract, and the defaults the core supplies for everything a strategy leaves out.

A strategy needs only six things (see `Strategy`). Trainable-parameter counting, saving and
loading the trainable weights, training and measurement come from the core. A strategy may
override ``save``/``load`` (the PEFT-backed built-ins do, to write PEFT's own format), may set
the optional attributes listed in `OPTIONAL_DEFAULTS`, and may declare how many parameters its
``apply`` leaves trainable with ``expected_trainable_parameters(model, config) -> int | None``,
computed from the base model before ``apply``; benchmarks and checks flag a disagreement.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
TASKS = ("causal-lm", "sequence-classification")


@runtime_checkable
class Strategy(Protocol):
    """What a plugin registers. Only these six members are required.

    ``apply`` receives the base model (a transformers model, possibly quantized by bitsandbytes)
    and an instance of ``config_class``. It returns the model to train, with exactly the parameters
    to train left ``requires_grad=True`` and everything else frozen. It must raise
    `adapters.AdaptersError` (leaving the model untouched) when the config cannot apply to it.
    """

    name: str  # lowercase words joined by hyphens, e.g. "lora"
    description: str  # one line
    config_class: type  # a dataclass whose fields all have types and defaults
    supported_quantization: frozenset[str]  # a subset of QUANTIZATIONS
    supported_tasks: frozenset[str]  # a subset of TASKS

    def apply(self, model: torch.nn.Module, config: Any) -> torch.nn.Module: ...


# Optional members and the value the core assumes when a strategy leaves them out.
OPTIONAL_DEFAULTS: dict[str, Any] = {
    # Quantization used when the user names the strategy without --quantization ("qlora" -> nf4).
    "default_quantization": "none",
    # False makes --gradient-checkpointing a configuration error for this strategy.
    "supports_gradient_checkpointing": True,
    # AdamW learning rate used when the user gives none.
    "default_learning_rate": 1e-4,
    # Training FLOPs per token in units of the base's parameter count N, for MFU: 6 when every
    # weight trains, ~4 when the base is frozen but backward runs through it, ~2 for forward only.
    "flops_per_token_factor": 4,
}


def option(strategy: Strategy, attribute: str) -> Any:
    """An optional strategy attribute, or the core's default for it."""
    return getattr(strategy, attribute, OPTIONAL_DEFAULTS[attribute])


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def _logical_numel(param: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit weights into each uint8 and keeps the logical shape in
    # quant_state; counting storage elements would halve the model.
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return param.numel()


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Trainable and total parameters, counting 4-bit packed weights as the weights they hold."""
    trainable = total = 0
    for param in model.parameters():
        n = _logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return ParameterCount(trainable, total)


def trainable_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) for every parameter left trainable, tied parameters once."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def freeze(model: torch.nn.Module) -> None:
    """Make every parameter of ``model`` non-trainable."""
    for param in model.parameters():
        param.requires_grad_(False)


def task_of(model: torch.nn.Module) -> str:
    """The task a loaded transformers model was built for: "causal-lm" or "sequence-classification"."""
    names = [cls.__name__ for cls in type(getattr(model, "get_base_model", lambda: model)()).__mro__]
    if any(n.endswith("ForSequenceClassification") for n in names):
        return "sequence-classification"
    if any(n.endswith("ForCausalLM") for n in names):
        return "causal-lm"
    raise ValueError(f"cannot tell the task of {type(model).__name__}")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of the linear layers (plain or bitsandbytes-quantized) in ``model``."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def output_head_name(model: torch.nn.Module) -> str:
    """Name of the module that maps the final hidden state to logits (lm_head, score, classifier)."""
    if task_of(model) == "causal-lm":
        head = model.get_output_embeddings()
        return next(n for n, m in model.named_modules() if m is head)
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), torch.nn.Linear):
            return name
    raise ValueError(f"{type(model).__name__} has no linear classification head")


def validate_strategy(strategy: Any) -> list[str]:
    """Problems with a strategy object's declaration; empty when it satisfies the contract."""
    import re

    problems = []
    for attr in ("name", "description", "config_class", "supported_quantization", "supported_tasks"):
        if not hasattr(strategy, attr):
            problems.append(f"has no `{attr}`")
    if not callable(getattr(strategy, "apply", None)):
        problems.append("has no `apply(model, config)` method")
    if problems:
        return problems
    if not isinstance(strategy.name, str) or not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", strategy.name):
        problems.append(f"name {strategy.name!r} is not lowercase words joined by hyphens")
    if not dataclasses.is_dataclass(strategy.config_class):
        problems.append("config_class is not a dataclass")
    else:
        for f in dataclasses.fields(strategy.config_class):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"config option `{f.name}` has no default")
    unknown_q = set(strategy.supported_quantization) - set(QUANTIZATIONS)
    if unknown_q:
        problems.append(f"supported_quantization has unknown values {sorted(unknown_q)}; use {QUANTIZATIONS}")
    unknown_t = set(strategy.supported_tasks) - set(TASKS)
    if unknown_t:
        problems.append(f"supported_tasks has unknown values {sorted(unknown_t)}; use {TASKS}")
    if option(strategy, "default_quantization") not in strategy.supported_quantization:
        problems.append("default_quantization is not in supported_quantization")
    return problems


def has_override(strategy: Strategy, method: str) -> bool:
    """Whether the strategy implements an optional method (``save``, ``load``, ...) itself."""
    return callable(getattr(strategy, method, None))


def declared_trainable(strategy: Strategy, model: torch.nn.Module, config: Any) -> int | None:
    """The trainable-parameter count a strategy declares for ``model`` (before apply), if it does."""
    if not has_override(strategy, "expected_trainable_parameters"):
        return None
    return strategy.expected_trainable_parameters(model, config)

