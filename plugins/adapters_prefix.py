"""Prefix tuning through PEFT: trained key/value prefixes in every attention layer.

Saved in PEFT's own format. Gradient checkpointing is refused: PEFT's prefix tuning passes its
prefixes as a cache, which checkpointed layers cannot replay.
"""
from __future__ import annotations

from dataclasses import dataclass

import adapters


@dataclass
class PrefixOptions:
    num_virtual_tokens: int = 20  # length of the trained prefix
    projection: bool = False  # reparameterize the prefix through an MLP while training

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be at least 1, not {self.num_virtual_tokens}")


class PrefixTuning(adapters.PeftStrategy):
    name = "prefix-tuning"
    description = "PEFT prefix tuning: trained key/value prefixes in every attention layer"
    config_class = PrefixOptions
    supported_quantization = frozenset(adapters.QUANTIZATIONS)
    # PEFT's prefix tuning for sequence classification needs a model that accepts past_key_values
    # in its classification forward; transformers 5's Llama and BERT heads do not.
    supported_tasks = frozenset({"causal-lm"})
    supports_gradient_checkpointing = False
    default_learning_rate = 1e-2

    def peft_config(self, model, config: PrefixOptions, loading: bool = False):
        from peft import PrefixTuningConfig

        # With projection, PEFT saves the MLP's output, the prefix as used at inference; only an
        # inference-mode model has that layout.
        return PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, prefix_projection=config.projection,
                                  task_type="CAUSAL_LM", inference_mode=loading and config.projection)

    def expected_trainable_parameters(self, model, config: PrefixOptions) -> int | None:
        if config.projection:
            return None  # the reparameterization MLP's width is PEFT's choice
        c = model.config
        kv_width = c.num_key_value_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
        return config.num_virtual_tokens * c.num_hidden_layers * 2 * kv_width  # a key and a value per layer

    def estimate_memory(self, model: adapters.ModelShape, config: PrefixOptions, run: adapters.RunShape):
        """The prefix itself (fp32); the base's attention then runs over the virtual tokens too."""
        trainable = self.expected_trainable_parameters(model.meta_model, config)
        if trainable is None:
            return None  # with projection, the MLP's width is PEFT's choice: no estimate rather than a guess
        return adapters.StrategyMemory(trainable, 4 * trainable, 4 * trainable, gradient_flow="inputs",
                                       extra_attention_tokens=config.num_virtual_tokens)


@adapters.hookimpl
def register_strategies(register):
    register(PrefixTuning())
