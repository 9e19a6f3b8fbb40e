"""A model's shape from its config alone: the skeleton built on the meta device, and its layer family.

The skeleton also lets a run check, before any weight loads, that its strategy applies to the model
(`check_applies`).
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch

from ..contract import LinearShape, ModelShape, Strategy, declared_trainable
from ..errors import AdaptersError
from ..models import check_model_task, model_config, quiet_transformers, resolve_model
from ..nn import is_linear, linear_features
from ..runspec import run_shape  # noqa: F401  (adapters.plan.run_shape)

# The layer families whose activations the memory model knows, by the modules a layer must have.
_FAMILY_PARTS = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"),
}
# Linear layers that read one tensor, and those whose input the base already keeps for backward.
_SHARED_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
                  "up_proj": "mlp_in", "query": "attn_in", "key": "attn_in", "value": "attn_in"}
_INPUT_KEPT = {"self_attn.o_proj"}  # SDPA keeps its output, which o_proj reads


def model_shape(name: str, task: str | None = None, device: str = "cuda", num_labels: int = 2) -> ModelShape:
    """The shape of a model from its config, on the meta device: nothing is downloaded or allocated."""
    task = check_model_task(resolve_model(name), task)
    model = meta_model(model_config(name), task, device, num_labels)
    c = model.config
    heads = getattr(c, "num_attention_heads", 0)
    head_dim = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else 0)
    layer = _first_layer(model)
    return ModelShape(
        name=name, config=c, task=task, meta_model=model, family=_family(layer) if layer is not None else None,
        hidden_size=c.hidden_size, num_layers=getattr(c, "num_hidden_layers", 0), num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate_size=getattr(c, "intermediate_size", 0), vocab_size=c.vocab_size,
        num_labels=num_labels, attention=getattr(c, "_attn_implementation", None) or "sdpa",
        layer_linears=_layer_linears(layer) if layer is not None else [],
    )


def meta_model(config: Any, task: str, device: str, num_labels: int) -> torch.nn.Module:
    """The model of a transformers ``config`` for ``task`` without weights, in the dtype training uses
    on ``device``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device("meta"), quiet_transformers():
        if task == "causal-lm":
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        config = copy.deepcopy(config)
        config.num_labels = num_labels
        return AutoModelForSequenceClassification.from_config(config, dtype=dtype, trust_remote_code=False)


def check_applies(strategy: Strategy, options: Any, config: Any, task: str, num_labels: int) -> None:
    """Apply ``strategy`` to the weightless skeleton of the model: an `AdaptersError` it raises there
    (target_modules that match no layer, say) surfaces before any weight loads.

    Any other error is left for the real model to show: the skeleton has no data to compute with
    and no quantization, so a strategy may fail on it where it would not on the model.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = meta_model(config, task, device, num_labels)
    try:
        with torch.device("meta"):  # what apply adds stays weightless too (and costs no time)
            declared_trainable(strategy, model, options)
            strategy.apply(model, options)
    except AdaptersError:
        raise
    except Exception:  # see the docstring
        pass


def _first_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    for name, module in model.named_modules():
        if re.search(r"\.layers?\.0$", name):
            return module
    return None


def _family(layer: torch.nn.Module) -> str | None:
    """"llama" or "bert" when the layer has every part of that family and its two norms; else None."""
    names = {n for n, _ in layer.named_modules()}
    for family, parts in _FAMILY_PARTS.items():
        if all(p in names for p in parts):
            norms = [m for n, m in layer.named_modules() if n.endswith(("layernorm", "LayerNorm"))]
            kind = "RMSNorm" if family == "llama" else "LayerNorm"
            if len(norms) == 2 and all(kind in type(m).__name__ for m in norms):
                return family
    return None


def _layer_linears(layer: torch.nn.Module) -> list[LinearShape]:
    out = []
    for name, module in layer.named_modules():
        if is_linear(module):
            leaf = name.rsplit(".", 1)[-1]
            out.append(LinearShape(leaf, *linear_features(module), _SHARED_INPUTS.get(leaf, name), name in _INPUT_KEPT))
    return out
