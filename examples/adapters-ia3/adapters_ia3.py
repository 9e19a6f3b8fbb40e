"""IA3 for adapters, through PEFT: learned vectors that rescale keys, values and feed-forward activations.

IA3 (Liu et al., 2022) trains one vector per targeted layer, initialised to ones, that multiplies
the layer's output (keys, values) or input (feed-forward layers): far fewer parameters than LoRA.
Written only against adapters' public API (``import adapters``, docs/plugins.md) and PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass

import adapters


@dataclass
class IA3Options:
    # "auto": PEFT's choice for the architecture (k_proj, v_proj, down_proj for Llama), or module names.
    target_modules: str = "auto"
    # Which targets are feed-forward layers, scaled on their input; "auto", or a subset of target_modules.
    feedforward_modules: str = "auto"


class IA3(adapters.PeftStrategy):
    # PEFT's IA3 with PEFT's own targets for the architecture; the built-in `ia3` targets every linear layer.
    name = "ia3-auto"
    description = "PEFT IA3: learned vectors that rescale keys, values and feed-forward activations"
    config_class = IA3Options
    supported_quantization = frozenset(adapters.QUANTIZATIONS)
    supported_tasks = frozenset(adapters.TASKS)
    default_learning_rate = 3e-3
    peft_types = frozenset({"IA3"})  # adapters.ImportsPeft: `adapters import` reads plain PEFT's IA3 directories

    def peft_config(self, model, config: IA3Options, loading: bool = False):
        """PEFT's IA3Config for ``model``; every mistake is an AdaptersError, raised before any change."""
        from peft import IA3Config
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as AUTO_FEEDFORWARD
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as AUTO_TARGETS

        kind = model.config.model_type
        if config.target_modules == "auto":
            if config.feedforward_modules != "auto":
                raise adapters.AdaptersError("ia3-auto: feedforward_modules needs target_modules too, e.g. "
                                             "--set target_modules=k_proj,v_proj,down_proj")
            if kind not in AUTO_TARGETS:
                raise adapters.AdaptersError(
                    f"ia3-auto has no default target modules for {kind!r} models; name them, e.g. "
                    "--set target_modules=k_proj,v_proj,down_proj --set feedforward_modules=down_proj")
            targets, feedforward = list(AUTO_TARGETS[kind]), list(AUTO_FEEDFORWARD.get(kind, []))
        else:
            targets = adapters.match_targets(model, config.target_modules)
            feedforward = [] if config.feedforward_modules == "auto" else \
                [n.strip() for n in config.feedforward_modules.split(",") if n.strip()]
        stray = sorted(set(feedforward) - set(targets))
        if stray:
            raise adapters.AdaptersError(f"ia3-auto: feedforward_modules {', '.join(stray)} are not among target_modules; "
                                         "list them there too.")
        return IA3Config(task_type=adapters.peft_task_type(model), target_modules=targets,
                         feedforward_modules=feedforward)

    def estimate_memory(self, model: adapters.ModelShape, config: IA3Options, run: adapters.RunShape):
        """Lets `adapters plan` predict IA3's memory: fp32 vectors, and what their products keep."""
        peft_config = self.peft_config(model.meta_model, config)  # the same checks as apply
        targets, feedforward = list(peft_config.target_modules), list(peft_config.feedforward_modules)
        trainable = largest = 0
        scaled_inputs = {name for name, _ in adapters.targeted_linears(model.meta_model, feedforward)}
        for name, module in adapters.targeted_linears(model.meta_model, targets):
            fan_in, fan_out = adapters.linear_features(module)
            width = fan_in if name in scaled_inputs else fan_out
            trainable += width
            largest = max(largest, width)
        leaf = lambda names: {n.rsplit(".", 1)[-1] for n in names}  # noqa: E731
        saved = 0
        for lin in model.layer_linears:
            if lin.name in leaf(feedforward):  # scales the input, cast to fp32
                saved += run.tokens * lin.in_features * 4
                if run.quantization == "int8":  # bitsandbytes' int8 matmul keeps its input: the scaled copy
                    saved += run.tokens * lin.in_features * 4
            elif lin.name in leaf(targets):  # scales the output, which the product keeps
                saved += run.tokens * lin.out_features * run.compute_bytes
        if run.task == "sequence-classification":  # PEFT trains a copy of the new head
            trainable += adapters.head_parameters(model.meta_model)
        return adapters.StrategyMemory(trainable, 4 * trainable, 4 * largest, gradient_flow="inputs",
                                       layer_activation_bytes=saved)


    def merge(self, model, config: IA3Options):
        """adapters.Merges: each vector multiplied into its layer's weight (rows for keys and values, columns
        for feed-forward inputs), through PEFT's ``merge_and_unload``."""
        return model.merge_and_unload()

    def options_from_peft(self, peft_config: dict) -> IA3Options:
        """adapters.ImportsPeft: PEFT's lists of module names become the comma-separated options."""
        from peft import IA3Config

        names = ("target_modules", "feedforward_modules")  # the same names in both
        joined = {k: ",".join(v) if isinstance(v, list) else v for k, v in peft_config.items() if k in names}
        return self.options_from_keys({**peft_config, **joined}, IA3Config, {k: k for k in names},
                                      derived={"fan_in_fan_out", "init_ia3_weights"})


@adapters.hookimpl
def register_strategies(register):
    register(IA3())
