"""LoRA through PEFT: low-rank adapters on linear layers. On a quantized base this is QLoRA.

Saved in PEFT's own format, so plain ``peft.PeftModel.from_pretrained(base, directory)`` loads it.
The base is not prepared with ``prepare_model_for_kbit_training``: its fp32 upcast of the frozen
modules is what makes the common QLoRA recipe use more memory than bf16 LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

import adapters


@dataclass
class LoraOptions:
    r: int = 16  # rank of each adapter
    alpha: int = 32  # scale: updates are multiplied by alpha / r
    # 0, as unsloth does: PEFT's dropout keeps a dropped copy of each adapter's input for backward (seven a Llama
    # layer), and on the built-in instruction data dropout 0.05 bought no held-out loss for that memory
    # (benchmarks/dropout.py, benchmarks/results/dropout-cpu-2core.json).
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"  # "all-linear", or module names such as q_proj,v_proj

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be at least 1, not {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, not {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:  # also false for NaN
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")


class Lora(adapters.PeftStrategy):
    name = "lora"
    description = "PEFT LoRA: low-rank adapters on linear layers"
    config_class = LoraOptions
    supported_quantization = frozenset(adapters.QUANTIZATIONS)
    supported_tasks = frozenset(adapters.TASKS)
    default_learning_rate = 2e-4
    peft_types = frozenset({"LORA"})  # adapters import reads plain PEFT's LoRA directories

    def peft_config(self, model, config: LoraOptions, loading: bool = False):
        from peft import LoraConfig

        targets = adapters.match_targets(model, config.target_modules)
        # GPT-2 style Conv1D layers store their weight transposed.
        transposed = any(type(m).__name__ == "Conv1D" for _, m in adapters.targeted_linears(model, targets))
        return LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                          fan_in_fan_out=transposed, task_type=adapters.peft_task_type(model))

    def expected_trainable_parameters(self, model, config: LoraOptions) -> int:
        targets = adapters.match_targets(model, config.target_modules)
        count = sum(config.r * sum(adapters.linear_features(m)) for _, m in adapters.targeted_linears(model, targets))
        if adapters.task_of(model) == "sequence-classification":  # PEFT trains a copy of the new head
            count += adapters.head_parameters(model)
        return count

    def estimate_memory(self, model: adapters.ModelShape, config: LoraOptions, run: adapters.RunShape):
        """Fp32 adapters (PEFT keeps them fp32 over a bf16 base) and what they save for backward."""
        targets = adapters.match_targets(model.meta_model, config.target_modules)
        trainable = self.expected_trainable_parameters(model.meta_model, config)
        matched = [m for _, m in adapters.targeted_linears(model.meta_model, targets)]
        largest = max([config.r * max(adapters.linear_features(m)) for m in matched], default=0)
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

    def options_from_peft(self, peft_config: dict) -> LoraOptions:
        """r, lora_alpha, lora_dropout and a list of target_modules; fan_in_fan_out follows from the base, and
        an initialisation that leaves the base as it was (gaussian, EVA) is replaced by the weights loaded."""
        from peft import LoraConfig

        init = peft_config.get("init_lora_weights", True)
        if init not in (True, False, "gaussian", "eva"):  # PiSSA, OLoRA, CorDA, LoftQ change the base's weights
            raise adapters.AdaptersError(
                f"adapter_config.json has init_lora_weights={init!r}, an initialisation that changes the base's "
                "own weights, so the adapter fits only that changed base. Convert it to a plain LoRA when saving "
                "(PEFT's path_initial_model_for_weight_conversion), then import it.")
        targets = peft_config.get("target_modules")
        if isinstance(targets, str) and targets != "all-linear":
            raise adapters.AdaptersError(
                f"adapter_config.json has target_modules={targets!r}, a regular expression, which strategy 'lora' "
                "has no option for (it takes module names). Save the adapter with a list of module names.")
        if isinstance(targets, list):  # PEFT saves a set, in no particular order
            peft_config = {**peft_config, "target_modules": sorted(targets)}
        return self.options_from_keys(peft_config, LoraConfig, {"r": "r", "lora_alpha": "alpha",
                                                                "lora_dropout": "dropout",
                                                                "target_modules": "target_modules"},
                                      derived={"fan_in_fan_out", "init_lora_weights", "eva_config"})

    def merge(self, model, config: LoraOptions):
        """W + (alpha / r) B A into each targeted weight (and a classification head's trained copy into the
        head), through PEFT's ``merge_and_unload``: the base model, unwrapped."""
        return model.merge_and_unload()


@adapters.hookimpl
def register_strategies(register):
    register(Lora(), aliases={"qlora": "nf4"})  # QLoRA: LoRA on an nf4-quantized base
