"""Every PEFT method by name: the tuners the installed PEFT registers, each a strategy.

The list is PEFT's own registry (`adapters.peft_methods`, read from ``peft.mapping``), not one written
here: each method is named after its PEFT type in lowercase words (``LOHA`` -> ``loha``,
``PROMPT_TUNING`` -> ``prompt-tuning``), and a newer PEFT brings its new methods. LoRA and prefix
tuning are built-ins of their own (``lora``, ``qlora``, ``prefix-tuning``).

- **Options** are the fields of the method's PEFT config class with PEFT's defaults, but PEFT's
  bookkeeping, what follows from the base, and values that would load files or code; layer tuners
  target ``all-linear``. A value set with ``--set`` is checked by PEFT's own config class.
- **What a method can do** is what PEFT declares: a quantized base where PEFT has bitsandbytes
  layers for it, the tasks its config accepts, merging where its layers merge, the model families
  it lists. `LIMITS` adds what the conformance kit found PEFT cannot do, each with the reason.
- **Saves** are PEFT's own format: plain ``PeftModel.from_pretrained`` loads them, and
  ``adapters import`` reads PEFT's own directories of each type.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional, Union

import adapters

# PEFT types a built-in strategy already provides.
BUILT_IN = frozenset({"LORA", "PREFIX_TUNING"})
# Methods that cannot train on their own in a run, and why.
NOT_REGISTERED = {
    "ADALORA": "it reallocates its ranks through update_and_allocate after every optimizer step, which no "
               "strategy can ask the training loop for",
    "XLORA": "it mixes LoRA adapters trained before; it trains no adapter of its own",
    "POLY": "it routes between task-specific modules by a task id that a run's batches do not carry",
    "MULTITASK_PROMPT_TUNING": "it selects a prompt by a task id that a run's batches do not carry",
}
# Fields no user option sets: worked out from the base, or values that would import a module, download a
# tokenizer or unpickle a file (a run's options never load code or pickles).
DERIVED = frozenset({"fan_in_fan_out"})
UNSAFE = ("path", "megatron", "tokenizer")
# Where PEFT leaves a field unset for its user to choose: the value here.
DEFAULTS = {"num_virtual_tokens": 20, "adapter_len": 10}
# Layer tuners whose targets are not linear layers: PEFT's own choice for the architecture stays the default.
OWN_TARGETS = frozenset({"LN_TUNING", "TRAINABLE_TOKENS"})
# What PEFT cannot do beyond what it declares, found by the conformance kit: {name: {what: reason}}.
LIMITS: dict[str, dict[str, str]] = {}

_ATOM_ORDER = ("bool", "int", "float", "str", "list[int]", "list[str]", "None")
_ATOMS = {"bool": bool, "int": int, "float": float, "str": str, "list[int]": list[int], "list[str]": list[str],
          "None": type(None)}


def strategy_name(peft_type: str) -> str:
    return peft_type.lower().replace("_", "-")


class PeftMethodStrategy(adapters.PeftStrategy):
    """One PEFT method, as PEFT describes it (an `adapters.PeftMethod`)."""

    def __init__(self, method: adapters.PeftMethod) -> None:
        self.method = method
        self.name = strategy_name(method.peft_type)
        limits = LIMITS.get(self.name, {})
        layers = method.kind == "layers"
        bits = {"4bit": {"nf4", "fp4"}, "8bit": {"int8"}}
        quantization = {"none"} | {q for b in method.bnb_layers for q in bits[b]} if layers else \
            set(adapters.QUANTIZATIONS)  # virtual tokens and prompts touch no quantized layer
        self.supported_quantization = frozenset(quantization - {q for q in adapters.QUANTIZATIONS if q in limits})
        self.supported_tasks = frozenset(t for t in method.tasks if t not in limits)
        self.supports_gradient_checkpointing = "gradient-checkpointing" not in limits
        self.default_learning_rate = 2e-4 if layers else 1e-2  # as lora's, and prefix-tuning's
        self.peft_types = frozenset({method.peft_type})  # adapters import reads PEFT's own directories of it
        self.config_class = options_class(method, self.name)
        kinds = {"layers": "adapts the base's layers", "prompt": "trains virtual tokens before the input",
                 "adaption-prompt": "trains prompts gated into the top attention layers"}
        self.description = f"PEFT {method.config_class.removesuffix('Config')}: {kinds[method.kind]}"
        if not method.merges:
            self.merge_refusal = (f"PEFT's {method.config_class.removesuffix('Config')} layers do not merge" if layers
                                  else "what it trains is read beside the input, not a weight of the base")

    def peft_config(self, model, config, loading: bool = False):
        values = peft_values(self.method, config)
        if self.method.kind == "layers":
            if "target_modules" in values and _targets_linears(self.method):
                values["target_modules"] = adapters.match_targets(model, config.target_modules)
            if any(o.name == "fan_in_fan_out" for o in self.method.options):  # GPT-2's Conv1D stores W transposed
                targets = adapters.match_targets(model, "all-linear")
                values["fan_in_fan_out"] = any(type(m).__name__ == "Conv1D"
                                               for _, m in adapters.targeted_linears(model, targets))
        if self.method.kind == "adaption-prompt" and values.get("adapter_layers") is None:
            values["adapter_layers"] = model.config.num_hidden_layers  # every layer
        if self.method.kind == "prompt":  # PEFT saves the prompt as used, which only inference mode reads back
            values["inference_mode"] = loading
        return build_peft_config(self.method, values, adapters.peft_task_type(model))

    def refuses_model(self, model_config) -> str | None:
        kinds = self.method.model_types
        if kinds is None or getattr(model_config, "model_type", None) in kinds:
            return None
        return f"PEFT's {self.method.config_class.removesuffix('Config')} knows only {', '.join(kinds)} models"

    def options_from_peft(self, peft_config: dict[str, Any]):
        import peft

        options = {f.name: f.name for f in dataclasses.fields(self.config_class)}
        return self.options_from_keys(peft_config, getattr(peft, self.method.config_class), options,
                                      derived=DERIVED | {"inference_mode"})


class MergingPeftMethodStrategy(PeftMethodStrategy):
    """A PEFT method whose layers merge."""

    def merge(self, model, config):
        """Each trained layer folded into the base's weight, through PEFT's ``merge_and_unload``."""
        return model.merge_and_unload()


def _user_facing(option: adapters.PeftOption) -> bool:
    return option.name not in DERIVED and not any(word in option.name for word in UNSAFE)


def _targets_linears(method: adapters.PeftMethod) -> bool:
    return method.kind == "layers" and method.peft_type not in OWN_TARGETS and any(
        o.name == "target_modules" and "str" in o.types for o in method.options)


def _default(method: adapters.PeftMethod, option: adapters.PeftOption) -> Any:
    if option.name == "target_modules" and _targets_linears(method):
        return "all-linear"
    return DEFAULTS.get(option.name, option.default) if option.default is None else option.default


def options_class(method: adapters.PeftMethod, name: str) -> type:
    """A dataclass of the method's user-facing options; building one builds PEFT's config from it, so PEFT checks it."""
    fields = []
    for option in filter(_user_facing, method.options):
        atoms = sorted(option.types, key=_ATOM_ORDER.index)
        hint = Union[tuple(_ATOMS[a] for a in atoms)] if len(atoms) > 1 else _ATOMS[atoms[0]]
        default = _default(method, option)
        if default is None and "None" not in atoms:
            hint = Optional[hint]
        value = dataclasses.field(default_factory=lambda d=default: list(d)) if isinstance(default, list) else \
            dataclasses.field(default=default)
        fields.append((option.name, hint, value))

    def __post_init__(self) -> None:
        build_peft_config(method, peft_values(method, self), adapters.PEFT_TASK_TYPES[(*method.tasks, "causal-lm")[0]])

    title = "".join(part.title() for part in name.split("-"))
    options = dataclasses.make_dataclass(f"{title}Options", fields, namespace={"__post_init__": __post_init__})
    options.__module__ = __name__
    return options


def peft_values(method: adapters.PeftMethod, config: Any) -> dict[str, Any]:
    """The options as PEFT's config takes them: a comma-separated string is a list where PEFT takes one."""
    listed = {o.name for o in method.options if {"list[str]", "list[int]"} & set(o.types)}
    values = {}
    for name, value in dataclasses.asdict(config).items():
        if name in listed and isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        values[name] = value
    return values


def build_peft_config(method: adapters.PeftMethod, values: dict[str, Any], task_type: str):
    """PEFT's config class built from ``values``; what it refuses is a ValueError naming the option."""
    import peft

    for option in method.options:
        value = values.get(option.name)
        if option.choices and isinstance(value, str) and value not in option.choices:
            raise ValueError(f"{option.name} must be one of {', '.join(option.choices)}, not {value!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(peft, method.config_class)(task_type=task_type, **values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"PEFT's {method.config_class} refuses it: {exc}") from None


@adapters.hookimpl
def register_strategies(register):
    try:
        methods = adapters.peft_methods()
    except adapters.AdaptersError as exc:  # PEFT is broken here: everything else still works
        warnings.warn(f"the PEFT methods are not available: {exc}", stacklevel=2)
        return
    for method in methods:
        if method.peft_type in BUILT_IN or method.peft_type in NOT_REGISTERED or method.unusable:
            continue
        register((MergingPeftMethodStrategy if method.merges else PeftMethodStrategy)(method))
