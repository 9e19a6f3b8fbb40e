"""Prefix tuning through PEFT: trained key/value prefixes in every attention layer.

Saved in PEFT's own format. Gradient checkpointing is refused: PEFT's prefix tuning passes its
prefixes as a cache, which checkpointed layers cannot replay. So are models whose layers are not
all attention layers (Mamba and other state-space or hybrid models): there is no key and value to
prefix in them.
"""
from __future__ import annotations

from dataclasses import dataclass

import adapters

# The layer kinds transformers configs list in ``layer_types`` that attend over keys and values.
ATTENTION_LAYERS = frozenset({"attention", "full_attention", "sliding_attention", "chunked_attention"})


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
    peft_types = frozenset({"PREFIX_TUNING"})  # adapters import reads plain PEFT's prefix tuning directories
    # Why `adapters merge` refuses it: it does not implement adapters.Merges.
    merge_refusal = ("its trained prefixes are keys and values that every attention layer reads beside the "
                     "text's own, not weights of the base, so there is nothing to fold into it")

    def refuses_model(self, model_config) -> str | None:
        others = set(getattr(model_config, "layer_types", None) or ()) - ATTENTION_LAYERS
        if not getattr(model_config, "num_attention_heads", None):
            what = "no attention layers"
        elif others:
            what = f"layers other than attention ({', '.join(sorted(others))})"
        else:
            return None
        return f"it has {what}, and prefix tuning adds trained keys and values to attention layers"

    def options_from_peft(self, peft_config: dict) -> PrefixOptions:
        """num_virtual_tokens and prefix_projection; the widths and counts PEFT records follow from the base
        (a load checks them against it)."""
        from peft import PrefixTuningConfig

        derived = {"token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules",
                   "encoder_hidden_size", "init_weights"}
        return self.options_from_keys(peft_config, PrefixTuningConfig,
                                      {"num_virtual_tokens": "num_virtual_tokens", "prefix_projection": "projection"},
                                      derived=derived)

    def peft_config(self, model, config: PrefixOptions, loading: bool = False):
        from peft import PrefixTuningConfig

        # Falcon names its key/value heads num_kv_heads, which PEFT does not read; without them the
        # prefix would get one key and value per query head.
        kv = {} if _kv_heads(model.config) is None or hasattr(model.config, "num_key_value_heads") else {
            "num_attention_heads": _kv_heads(model.config), "token_dim": _kv_width(model.config)}
        # With projection, PEFT saves the MLP's output, the prefix as used at inference; only an
        # inference-mode model has that layout.
        return PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, prefix_projection=config.projection,
                                  task_type="CAUSAL_LM", inference_mode=loading and config.projection, **kv)

    def expected_trainable_parameters(self, model, config: PrefixOptions) -> int | None:
        if config.projection:
            return None  # the reparameterization MLP's width is PEFT's choice
        # A key and a value per layer.
        return config.num_virtual_tokens * model.config.num_hidden_layers * 2 * _kv_width(model.config)

    def estimate_memory(self, model: adapters.ModelShape, config: PrefixOptions, run: adapters.RunShape):
        """The prefix itself (fp32); the base's attention then runs over the virtual tokens too."""
        trainable = self.expected_trainable_parameters(model.meta_model, config)
        if trainable is None:
            return None  # with projection, the MLP's width is PEFT's choice: no estimate rather than a guess
        return adapters.StrategyMemory(trainable, 4 * trainable, 4 * trainable, gradient_flow="inputs",
                                       extra_attention_tokens=config.num_virtual_tokens)


def _kv_heads(c) -> int | None:
    """Key/value heads, where they differ from the query heads (grouped or multi-query attention)."""
    if getattr(c, "num_key_value_heads", None):
        return c.num_key_value_heads
    if getattr(c, "num_kv_heads", None):  # Falcon: its older multi-query layout has one
        new_layout = getattr(c, "new_decoder_architecture", False) or not getattr(c, "multi_query", False)
        return c.num_kv_heads if new_layout else 1
    return None


def _kv_width(c) -> int:
    """The width of one layer's keys (and values): heads times head width."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (_kv_heads(c) or c.num_attention_heads) * head_dim


@adapters.hookimpl
def register_strategies(register):
    register(PrefixTuning())
