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
    """The task a loaded transformers model was built for: "causal-lm" or "sequence-classification".

    Read from transformers' own auto mappings (the class ``AutoModelForCausalLM`` or
    ``AutoModelForSequenceClassification`` builds for each model type), so GPT-2's
    ``GPT2LMHeadModel`` is a causal LM like any ``...ForCausalLM``; a subclass counts as its base.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    names = {cls.__name__ for cls in type(getattr(model, "get_base_model", lambda: model)()).__mro__}
    if names & set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()):
        return "sequence-classification"
    if names & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "causal-lm"
    raise ValueError(f"cannot tell the task of {type(model).__name__}: transformers maps no model type to it "
                     "for causal-lm or sequence-classification")


def is_linear(module: torch.nn.Module) -> bool:
    """A linear layer: torch's (plain or bitsandbytes-quantized), or the transposed ``Conv1D`` of GPT-2."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def linear_features(module: torch.nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer (`is_linear`)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    return module.nx, module.nf  # Conv1D: weight is (in, out)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of the linear layers (`is_linear`) in ``model``."""
    return [name for name, module in model.named_modules() if is_linear(module)]


CLASSIFICATION_HEADS = ("score", "classifier")  # what transformers names the head of ...ForSequenceClassification


def output_head_name(model: torch.nn.Module) -> str:
    """Name of the module that maps the final hidden state to logits: the LM head (``lm_head``), or a
    classification head (``score``, ``classifier``), which may be more than one layer (RoBERTa's is a
    dense layer and ``out_proj``)."""
    if task_of(model) == "causal-lm":
        head = model.get_output_embeddings()
        return next(n for n, m in model.named_modules() if m is head)
    for name in CLASSIFICATION_HEADS:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no classification head named {' or '.join(CLASSIFICATION_HEADS)}")


def _in_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


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
    linear = [n for n in linear_module_names(model) if not _in_head(n, head)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if not leaves:
        raise AdaptersError(f"{option}: this model has no linear layer besides its output head. "
                            "Choose a strategy that does not adapt linear layers.")
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


def targeted_linears(model: torch.nn.Module, targets: list[str]) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every linear layer (`is_linear`) that ``targets`` (from `match_targets`) selects,
    output head excluded; `linear_features` gives each one's widths."""
    head = output_head_name(model)
    return [(n, m) for n, m in model.named_modules() if is_linear(m) and matches(n, targets) and not _in_head(n, head)]


def head_parameters(model: torch.nn.Module) -> int:
    """Parameters of the output head (the new classification head, or the LM head)."""
    return sum(p.numel() for p in model.get_submodule(output_head_name(model)).parameters())
