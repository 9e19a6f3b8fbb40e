"""Full fine-tuning: every weight trains. Refused on quantized bases, whose weights cannot train."""
from __future__ import annotations

import collections
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
        """Every base weight trains, as a float32 master weight. Under bf16 autocast (CUDA's default) a layer keeps
        more for backward than the base's activations in bf16 (`float32_stream_bytes`)."""
        sizes = [p.numel() for p in model.meta_model.parameters()]
        return adapters.StrategyMemory(sum(sizes), sum(sizes) * run.master_bytes, max(sizes) * run.master_bytes,
                                       gradient_flow="weights", base_parameters_trained=sum(sizes),
                                       layer_activation_bytes=float32_stream_bytes(model, run))

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


def float32_stream_bytes(model: adapters.ModelShape, run: adapters.RunShape) -> int:
    """What one layer keeps under bf16 autocast beyond its activations in bf16, when every weight is a float32 master:
    autocast's bf16 copy of each linear weight; and, since the embeddings are float32 too, so is the residual stream
    between the layers, so autocast casts a norm's output to bf16 once for each linear that reads it (q, k and v a
    copy each, gate and up), and a Llama RMSNorm keeps its float32 output for its weight's gradient. Checked tensor by
    tensor on SmolLM2's shape on the CPU under bf16 autocast."""
    if not run.autocast:
        return 0
    weights = sum(lin.in_features * lin.out_features * 2 for lin in model.layer_linears)
    readers = collections.Counter(lin.input_group for lin in model.layer_linears)
    width = {lin.input_group: lin.in_features for lin in model.layer_linears}
    casts = sum((count - 1) * run.tokens * width[group] * 2 for group, count in readers.items())
    norms = 2 * run.tokens * model.hidden_size * 2 if model.family == "llama" else 0  # float32, not bf16
    return weights + casts + norms
