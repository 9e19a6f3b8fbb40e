"""Full fine-tuning: every weight trains. Refused on quantized bases, whose weights cannot train."""
from __future__ import annotations

from dataclasses import dataclass

import adapters


@dataclass
class FullOptions:
    pass  # nothing to choose: every parameter trains


class FullFinetune(adapters.StrategyBase):
    name = "full-finetune"
    description = "trains every weight of an unquantized base"
    config_class = FullOptions
    supported_quantization = frozenset({"none"})
    supported_tasks = frozenset(adapters.TASKS)
    default_learning_rate = 5e-5
    flops_per_token_factor = 6  # every weight trains: forward, input and weight gradients

    def expected_trainable_parameters(self, model, config: FullOptions) -> int:
        return adapters.count_parameters(model).total

    def estimate_memory(self, model: adapters.ModelShape, config: FullOptions, run: adapters.RunShape):
        """Every base weight trains, as a float32 master weight. Under bf16 autocast (CUDA's default), autocast's
        bf16 copy of each linear weight is kept for backward, with the layer's activations."""
        sizes = [p.numel() for p in model.meta_model.parameters()]
        copies = sum(lin.in_features * lin.out_features * 2 for lin in model.layer_linears) if run.autocast else 0
        return adapters.StrategyMemory(sum(sizes), sum(sizes) * run.master_bytes, max(sizes) * run.master_bytes,
                                       gradient_flow="weights", base_parameters_trained=sum(sizes),
                                       layer_activation_bytes=copies)

    def apply(self, model, config: FullOptions):
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def merge(self, model, config: FullOptions):
        """The trained model is the base itself, every weight in place."""
        return model


@adapters.hookimpl
def register_strategies(register):
    register(FullFinetune())
