"""IA3 for adapters, through PEFT: learned vectors that rescale keys, values and feed-forward activations.

IA3 (Liu et al., 2022) trains one vector per targeted layer, initialised to ones, that multiplies
the layer's output (keys, values) or input (feed-forward layers): far fewer parameters than LoRA.
Written only against adapters' public API (``import adapters``) and PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass

import adapters

_PEFT_TASK = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}


@dataclass
class IA3Options:
    # "auto": PEFT's choice for the architecture (k_proj, v_proj, down_proj for Llama), or module names.
    target_modules: str = "auto"
    # Which targets are feed-forward layers, scaled on their input; "auto", or a subset of target_modules.
    feedforward_modules: str = "auto"


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


class IA3:
    name = "ia3"
    description = "PEFT IA3: learned vectors that rescale keys, values and feed-forward activations"
    config_class = IA3Options
    supported_quantization = frozenset(adapters.QUANTIZATIONS)
    supported_tasks = frozenset(adapters.TASKS)
    default_learning_rate = 3e-3

    def _peft_config(self, model, config: IA3Options, inference: bool = False):
        """PEFT's IA3Config for ``model``; every mistake is an AdaptersError, raised before any change."""
        from peft import IA3Config
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as AUTO_TARGETS

        task_type = _PEFT_TASK[adapters.task_of(model)]
        if config.target_modules == "auto":
            if config.feedforward_modules != "auto":
                raise adapters.AdaptersError("ia3: feedforward_modules needs target_modules too, e.g. "
                                             "--set target_modules=k_proj,v_proj,down_proj")
            if model.config.model_type not in AUTO_TARGETS:
                raise adapters.AdaptersError(
                    f"ia3 has no default target modules for {model.config.model_type!r} models; "
                    "name them, e.g. --set target_modules=k_proj,v_proj,down_proj --set feedforward_modules=down_proj")
            return IA3Config(task_type=task_type, inference_mode=inference)
        head = adapters.output_head_name(model)
        linear = [n for n in adapters.linear_module_names(model) if n != head]
        targets = _names(config.target_modules)
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
        if unmatched or not targets:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise adapters.AdaptersError(f"ia3: target_modules {', '.join(unmatched) or '(empty)'} match no linear "
                                         f"layer of this model; use names from: {', '.join(leaves)}.")
        feedforward = [] if config.feedforward_modules == "auto" else _names(config.feedforward_modules)
        stray = sorted(set(feedforward) - set(targets))
        if stray:
            raise adapters.AdaptersError(f"ia3: feedforward_modules {', '.join(stray)} are not among target_modules; "
                                         "list them there too.")
        return IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=feedforward,
                         inference_mode=inference)

    def apply(self, model, config: IA3Options):
        from peft import get_peft_model

        return get_peft_model(model, self._peft_config(model, config))

    def estimate_memory(self, model, config: IA3Options, run):
        """Lets `adapters plan` predict IA3's memory: fp32 vectors, and what their products keep."""
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as AUTO_FEEDFORWARD
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as AUTO_TARGETS

        peft_config = self._peft_config(model.meta_model, config)  # the same checks as apply
        kind = model.config.model_type
        targets = set(peft_config.target_modules or AUTO_TARGETS[kind])
        feedforward = set(peft_config.feedforward_modules or AUTO_FEEDFORWARD.get(kind, []))
        leaf = {t.rsplit(".", 1)[-1] for t in targets}
        trainable = largest = saved = 0
        for name, module in model.meta_model.named_modules():
            if hasattr(module, "in_features") and any(name == t or name.endswith("." + t) for t in targets):
                ff = any(name == t or name.endswith("." + t) for t in feedforward)
                width = module.in_features if ff else module.out_features
                trainable += width
                largest = max(largest, width)
        for lin in model.layer_linears:
            if lin.name in leaf:
                if lin.name in {f.rsplit(".", 1)[-1] for f in feedforward}:  # scales the input, cast to fp32
                    saved += run.tokens * lin.in_features * 4
                else:  # scales the output, which the product keeps
                    saved += run.tokens * lin.out_features * run.compute_bytes
        if run.task == "sequence-classification":  # PEFT trains a copy of the new head
            head = model.meta_model.get_submodule(adapters.output_head_name(model.meta_model))
            trainable += sum(p.numel() for p in head.parameters())
        return adapters.StrategyMemory(trainable, 4 * trainable, 4 * largest, gradient_flow="inputs",
                                       layer_activation_bytes=saved)

    # Saved in PEFT's own format: plain `PeftModel.from_pretrained(base, directory)` loads it too.
    def save(self, model, directory, config: IA3Options):
        adapters.save_peft(model, directory)

    def load(self, model, directory, config: IA3Options):
        return adapters.load_peft(self.apply(model, config), directory)


@adapters.hookimpl
def register_strategies(register):
    register(IA3())
