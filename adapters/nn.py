"""Helpers on torch modules that every strategy would otherwise write again.

Counting and freezing parameters, telling a model's task and output head, and matching
``target_modules`` against its linear layers. Public API: `adapters.match_targets` and friends.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import AdaptersError


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


def _names(target_modules: str | list[str]) -> list[str]:
    wanted = target_modules.split(",") if isinstance(target_modules, str) else list(target_modules)
    return [w.strip() for w in wanted if w.strip()]


def matches(name: str, targets: list[str]) -> bool:
    """Whether the module called ``name`` is one of ``targets`` (full names, or their last parts)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def match_targets(model: torch.nn.Module, target_modules: str | list[str], option: str = "target_modules") -> list[str]:
    """``target_modules`` checked against the linear layers of ``model``, output head excluded.

    ``"all-linear"`` gives the last part of every linear layer's name (``q_proj``, ``up_proj``, ...).
    Otherwise the names given (a comma-separated string or a list) are returned as they are; a name
    that matches no linear layer raises `AdaptersError` naming it and the names there are, before
    anything changes. ``option`` is the option's name in that message.
    """
    head = output_head_name(model)
    linear = [n for n in linear_module_names(model) if n != head]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if target_modules == "all-linear":
        return leaves
    wanted = _names(target_modules)
    unmatched = [w for w in wanted if not any(matches(n, [w]) for n in linear)]
    if unmatched or not wanted:
        raise AdaptersError(
            f"{option} {', '.join(unmatched) or '(empty)'} match no linear layer of this model. "
            f"Use names from: {', '.join(leaves)} (e.g. --set {option}={','.join(leaves[:2])})."
        )
    return wanted


def targeted_linears(model: torch.nn.Module, targets: list[str]) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every linear layer that ``targets`` (from `match_targets`) selects."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and matches(n, targets)]


def head_parameters(model: torch.nn.Module) -> int:
    """Parameters of the output head (the new classification head, or the LM head)."""
    return sum(p.numel() for p in model.get_submodule(output_head_name(model)).parameters())
