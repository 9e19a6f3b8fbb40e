"""LoRA through PEFT: low-rank adapters on linear layers. On a quantized base this is QLoRA.

Saved in PEFT's own format, so plain ``peft.PeftModel.from_pretrained(base, directory)`` loads it.
The base is not prepared with ``prepare_model_for_kbit_training``: its fp32 upcast of the frozen
modules is what makes the common QLoRA recipe use more memory than bf16 LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import adapters

_PEFT_TASK = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}


@dataclass
class LoraOptions:
    r: int = 16  # rank of each adapter
    alpha: int = 32  # scale: updates are multiplied by alpha / r
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"  # "all-linear", or module names such as q_proj,v_proj

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be at least 1, not {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, not {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:  # also false for NaN
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")


def resolve_targets(model, target_modules: str | list[str]) -> list[str]:
    """Module names for PEFT; names that match no linear layer are an error, raised before any change."""
    head = adapters.output_head_name(model)
    linear = [n for n in adapters.linear_module_names(model) if n != head]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if target_modules == "all-linear":
        return leaves
    wanted = target_modules.split(",") if isinstance(target_modules, str) else list(target_modules)
    wanted = [w.strip() for w in wanted if w.strip()]
    unmatched = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in linear)]
    if unmatched or not wanted:
        raise adapters.AdaptersError(
            f"target_modules {', '.join(unmatched) or '(empty)'} match no linear layer of this model. "
            f"Use names from: {', '.join(leaves)} (e.g. --set target_modules={','.join(leaves[:2])})."
        )
    return wanted


class Lora:
    config_class = LoraOptions
    supported_quantization = frozenset(adapters.QUANTIZATIONS)
    supported_tasks = frozenset(adapters.TASKS)
    default_learning_rate = 2e-4

    def __init__(self, name: str = "lora", default_quantization: str = "none") -> None:
        self.name = name
        self.default_quantization = default_quantization
        self.description = (
            "PEFT LoRA: low-rank adapters on linear layers"
            if default_quantization == "none"
            else f"alias for lora on a {default_quantization}-quantized base (QLoRA)"
        )

    def apply(self, model, config: LoraOptions):
        from peft import LoraConfig, get_peft_model

        targets = resolve_targets(model, config.target_modules)
        peft_config = LoraConfig(
            r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
            task_type=_PEFT_TASK[adapters.task_of(model)],
        )
        return get_peft_model(model, peft_config)

    def expected_trainable_parameters(self, model, config: LoraOptions) -> int:
        targets = resolve_targets(model, config.target_modules)
        count = 0
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
                count += config.r * (module.in_features + module.out_features)
        if adapters.task_of(model) == "sequence-classification":  # PEFT trains a copy of the new head
            count += sum(p.numel() for p in model.get_submodule(adapters.output_head_name(model)).parameters())
        return count

    def estimate_memory(self, model, config: LoraOptions, run):
        """Fp32 adapters (PEFT keeps them fp32 over a bf16 base) and what they save for backward."""
        targets = resolve_targets(model.meta_model, config.target_modules)
        trainable = self.expected_trainable_parameters(model.meta_model, config)
        matched = [m for n, m in model.meta_model.named_modules() if isinstance(m, torch.nn.Linear)
                   and any(n == t or n.endswith("." + t) for t in targets)]
        largest = max([config.r * max(m.in_features, m.out_features) for m in matched], default=0)
        leaves = {t.rsplit(".", 1)[-1] for t in targets}
        per_layer = [lin for lin in model.layer_linears if lin.name in leaves]
        n, cuda = run.tokens, run.device == "cuda"
        saved = 0
        if config.dropout > 0:  # each adapter's dropout keeps its mask and its output (cast to bf16 on CUDA)
            for lin in per_layer:
                saved += n * lin.in_features * (run.dropout_mask_bytes + (2 if cuda else 4))
        elif cuda:  # each adapter casts its input to fp32, and autocast casts it back: a bf16 copy each
            saved += sum(n * lin.in_features * 2 for lin in per_layer)
        else:  # lora_A keeps the layer's own tensor, once per distinct input the base does not keep already
            inputs = {lin.input_group: lin.in_features for lin in per_layer if not lin.input_kept}
            saved += sum(n * width * 4 for width in inputs.values())
        saved += len(per_layer) * n * config.r * (2 if cuda else 4)  # lora_A's output, kept by lora_B
        return adapters.StrategyMemory(trainable, 4 * trainable, 4 * largest, gradient_flow="inputs",
                                       layer_activation_bytes=saved)

    def save(self, model, directory, config):
        adapters.save_peft(model, directory)

    def load(self, model, directory, config):
        return adapters.load_peft(self.apply(model, config), directory)


@adapters.hookimpl
def register_strategies(register):
    register(Lora())
    register(Lora("qlora", "nf4"))
