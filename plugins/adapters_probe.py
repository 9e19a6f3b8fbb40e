"""Linear probe: a frozen base and one trainable linear head on its final hidden state.

For sequence classification the head is the model's new classification head; for causal-lm it is
an untied, trainable copy of the output projection. Nothing upstream of the head requires a
gradient, so autograd records no graph through the base and memory stays near inference.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import adapters


@dataclass
class ProbeOptions:
    pass  # the probe has no options: the head's shape follows from the model


def _checkpointing(model) -> bool:
    # transformers 5.x renamed is_gradient_checkpointing to is_activation_checkpointing.
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


class LinearProbe(adapters.StrategyBase):
    name = "linear-probe"
    description = "frozen base; trains only a linear head on the final hidden state"
    config_class = ProbeOptions
    supported_quantization = frozenset(adapters.QUANTIZATIONS)
    supported_tasks = frozenset(adapters.TASKS)
    default_learning_rate = 1e-3
    flops_per_token_factor = 2  # the base runs forward only; the head's backward is negligible

    def expected_trainable_parameters(self, model, config: ProbeOptions) -> int:
        return adapters.head_parameters(model)

    def estimate_memory(self, model: adapters.ModelShape, config: ProbeOptions, run: adapters.RunShape):
        """The head as a float32 master weight; for causal-lm a new untied copy, for classification the base's own."""
        trainable = self.expected_trainable_parameters(model.meta_model, config)
        size = trainable * run.master_bytes
        meta = model.meta_model
        tied = meta.get_output_embeddings() is not None and \
            meta.get_output_embeddings().weight is meta.get_input_embeddings().weight
        own = 0 if run.task == "causal-lm" and tied else trainable  # an untied head is replaced, not kept
        return adapters.StrategyMemory(trainable, size, size, gradient_flow="head", base_parameters_trained=own)

    def apply(self, model, config: ProbeOptions):
        import torch

        adapters.freeze(model)
        # Checkpointing would only re-run a base that records no graph; input gradients would make one.
        if model.supports_gradient_checkpointing and _checkpointing(model):
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
        with contextlib.suppress(AttributeError):  # older transformers raise when no hook is set
            model.disable_input_require_grads()
        if adapters.task_of(model) == "causal-lm":
            tied = model.get_output_embeddings()
            head = torch.nn.Linear(tied.in_features, tied.out_features, bias=tied.bias is not None,
                                   device=tied.weight.device, dtype=tied.weight.dtype)
            with torch.no_grad():
                head.weight.copy_(tied.weight)
                if tied.bias is not None:
                    head.bias.copy_(tied.bias)
            model.set_output_embeddings(head)
            model.config.tie_word_embeddings = False
        else:
            head = model.get_submodule(adapters.output_head_name(model))
        head.requires_grad_(True)
        return model

    def merge(self, model, config: ProbeOptions):
        """The base with its trained head. For causal-lm the head is the untied copy apply made, and
        ``apply`` set ``tie_word_embeddings=False`` so that a reload keeps it apart from the embeddings."""
        return model


@adapters.hookimpl
def register_strategies(register):
    register(LinearProbe())
