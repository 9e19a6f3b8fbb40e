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
import functools
import warnings
from typing import Any, Union

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
    "TRAINABLE_TOKENS": "it trains the embeddings of the tokens listed in token_indices, which no default fits",
    "CPT": "its prompt is made of the token ids of in-context examples (cpt_token_ids), which no default fits",
}
# Fields no user option sets: worked out from the base, or values that would import a module, download a
# tokenizer or unpickle a file (a run's options never load code or pickles).
DERIVED = frozenset({"fan_in_fan_out"})
UNSAFE = ("path", "megatron", "tokenizer")
# Where PEFT leaves a field unset for its user to choose: the value here.
DEFAULTS = {"num_virtual_tokens": 20, "adapter_len": 10}
# Layer tuners whose targets are not linear layers: PEFT's own choice for the architecture stays the default.
OWN_TARGETS = frozenset({"LN_TUNING", "SHADOW"})
# Sizes whose PEFT default is made for large models: None picks PEFT's default where it fits every targeted
# layer, else the largest value below it that does. (PEFT type, option) -> what the value must divide...
DIVIDES = {("C3A", "block_size"): (0, 1), ("VBLORA", "vector_length"): (0, 1), ("ROAD", "group_size"): (1,)}
# ... or the largest value a layer of in x out features takes.
AT_MOST = {("WAVEFT", "n_frequency"): lambda i, o: i * o, ("SHIRA", "r"): lambda i, o: i * o // (i + o)}
# Prompt learning that PEFT saves as its encoder computes it, which only a model in inference mode reads back.
REPARAMETERIZED = frozenset({"P_TUNING"})
# What PEFT cannot do beyond what it declares, found by the conformance kit: refused up front, with the reason.
LIMITS = {
    "beft": {"merge": "PEFT cannot merge a trained bias into a layer that has none, as Llama's layers do not"},
    "cartridge": {"gradient-checkpointing": "PEFT refuses it for CARTRIDGE",
                  "sequence-classification": "PEFT passes its cache as past key values, which transformers' "
                                             "classification heads do not take"},
    "lily": {"merge": "PEFT's Lily layers raise NotImplementedError when merged"},
}
# Checks of `adapters check` that fail for a method although it trains, with the reason.
VIRTUAL_LOGITS = "PEFT's causal-lm outputs include the virtual tokens, which the check cannot line up with the base's"
KNOWN_FAILURES = {
    "ln-tuning": {"merge": "on sequence classification PEFT leaves the trained head wrapped in its own module"},
    "p-tuning": {"save-load": VIRTUAL_LOGITS,
                 "resume": "PEFT saves the prompt as its encoder computes it, for inference, so a stopped run "
                           "cannot continue from it"},
    "prompt-tuning": {"save-load": VIRTUAL_LOGITS},
    "shadow": {"train-step": "PEFT gives the last layer an update transform whose output no layer reads"},
}

_ATOM_ORDER = ("bool", "int", "float", "str", "list[int]", "list[str]")
_ATOMS = {"bool": bool, "int": int, "float": float, "str": str, "list[int]": list[int], "list[str]": list[str]}
_KINDS = {"layers": "adapts the base's layers", "prompt": "trains virtual tokens before the input",
          "adaption-prompt": "trains prompts gated into the top attention layers"}


class PeftMethodStrategy(adapters.PeftStrategy):
    """One PEFT method, as PEFT describes it (an `adapters.PeftMethod`)."""

    def __init__(self, method: adapters.PeftMethod) -> None:
        self.method = method
        self.name = strategy_name(method.peft_type)
        self.title = method.config_class.removesuffix("Config")
        self.limits = LIMITS.get(self.name, {})
        self.known_failures = KNOWN_FAILURES.get(self.name, {})
        layers = method.kind == "layers"
        bits = {"4bit": {"nf4", "fp4"}, "8bit": {"int8"}}
        # Virtual tokens and prompts touch no quantized layer; a layer tuner needs PEFT's bitsandbytes layers.
        quantization = {"none"}.union(*(bits[b] for b in method.bnb_layers)) if layers else set(adapters.QUANTIZATIONS)
        self.supported_quantization = frozenset(quantization - set(self.limits))
        self.supported_tasks = frozenset(set(method.tasks) - set(self.limits))
        self.supports_gradient_checkpointing = "gradient-checkpointing" not in self.limits
        self.default_learning_rate = 2e-4 if layers else 1e-2  # as lora's, and prefix-tuning's
        self.peft_types = frozenset({method.peft_type})  # adapters import reads PEFT's own directories of it
        self.config_class = options_class(method, self.name)
        self.description = f"PEFT {self.title}: {_KINDS[method.kind]}"
        if not method.merges or "merge" in self.limits:
            self.merge_refusal = self.limits.get("merge") or (
                f"PEFT's {self.title} layers do not merge" if layers
                else "what it trains is read beside the input, not a weight of the base")

    def peft_config(self, model, config, loading: bool = False):
        values = peft_values(self.method, config)
        if _targets_linears(self.method):
            targets = adapters.match_targets(model, config.target_modules)
            values["target_modules"] = targets
            widths = [adapters.linear_features(m) for _, m in adapters.targeted_linears(model, targets)]
            values.update(_fitted(self.method, values, widths))
            if any(o.name == "fan_in_fan_out" for o in self.method.options):  # GPT-2's Conv1D stores W transposed
                values["fan_in_fan_out"] = any(type(m).__name__ == "Conv1D"
                                               for _, m in adapters.targeted_linears(model, targets))
        if self.method.kind == "adaption-prompt" and values.get("adapter_layers") is None:
            values["adapter_layers"] = model.config.num_hidden_layers  # every layer
        if self.method.peft_type in REPARAMETERIZED:
            values["inference_mode"] = loading
        return build_peft_config(self.method, values, adapters.peft_task_type(model))

    def refuses_model(self, model_config) -> str | None:
        kinds = self.method.model_types
        if kinds is None or getattr(model_config, "model_type", None) in kinds:
            return None
        return f"PEFT's {self.title} knows only {', '.join(kinds)} models"

    def options_from_peft(self, peft_config: dict[str, Any]):
        """Every option from its own key, lists of names as the comma-separated names an option holds; what PEFT
        works out from the base follows from it again."""
        import peft

        names = {o.name for o in self.method.options if "list[str]" in o.types}
        joined = {k: ",".join(sorted(v)) for k, v in peft_config.items() if k in names and isinstance(v, list)}
        options = {f.name: f.name for f in dataclasses.fields(self.config_class)}
        return self.options_from_keys({**peft_config, **joined}, getattr(peft, self.method.config_class), options,
                                      derived=DERIVED | {"inference_mode"})


class MergingPeftMethodStrategy(PeftMethodStrategy):
    """A PEFT method whose layers merge (`adapters.Merges`)."""

    def merge(self, model, config):
        """Each trained layer folded into the base's weight, through PEFT's ``merge_and_unload``."""
        return model.merge_and_unload()


def _targets_linears(method: adapters.PeftMethod) -> bool:
    return method.kind == "layers" and method.peft_type not in OWN_TARGETS and any(
        o.name == "target_modules" and "str" in o.types for o in method.options)


def _fitted(method: adapters.PeftMethod, values: dict[str, Any], widths: list[tuple[int, int]]) -> dict[str, int]:
    """The sizes left to None (`DIVIDES`, `AT_MOST`), fitted to the targeted layers' (in, out) widths."""
    fitted = {}
    for option in method.options:
        key = (method.peft_type, option.name)
        if values.get(option.name) is not None or key not in {**DIVIDES, **AT_MOST}:
            continue
        if key in DIVIDES:
            sizes = [w[i] for w in widths for i in DIVIDES[key]]
            fitted[option.name] = next(d for d in range(option.default, 0, -1) if all(s % d == 0 for s in sizes))
        else:
            fitted[option.name] = min([option.default, *(AT_MOST[key](i, o) for i, o in widths)])
    return fitted


def _default(method: adapters.PeftMethod, option: adapters.PeftOption) -> Any:
    if option.name == "target_modules" and _targets_linears(method):
        return "all-linear"
    if (method.peft_type, option.name) in {**DIVIDES, **AT_MOST}:
        return None
    return DEFAULTS.get(option.name) if option.default is None else option.default


def options_class(method: adapters.PeftMethod, name: str) -> type:
    """A dataclass of the method's options; building one builds PEFT's config from it, so PEFT checks each value."""
    fields = []
    for option in method.options:
        if option.name in DERIVED or any(word in option.name for word in UNSAFE):
            continue
        atoms = sorted((a for a in option.types if a != "None"), key=_ATOM_ORDER.index)
        default = _default(method, option)
        # None only where it is the default (unset until PEFT works it out): "none" is a string some options take.
        # One Union of them all, in this order, strings before lists: Optional of a Union could come back as an
        # equal Union from typing's cache, in PEFT's order, and --set would then read names as a list.
        hint = Union[tuple(_ATOMS[a] for a in atoms) + ((type(None),) if default is None else ())]  # noqa: UP007
        fields.append((option.name, hint, dataclasses.field(default_factory=lambda d=default: list(d))
                       if isinstance(default, list) else dataclasses.field(default=default)))

    def __post_init__(self) -> None:
        task = (*method.tasks, "causal-lm")[0]
        build_peft_config(method, peft_values(method, self), adapters.PEFT_TASK_TYPES[task])

    title = "".join(part.title() for part in name.split("-"))
    options = dataclasses.make_dataclass(f"{title}Options", fields, namespace={"__post_init__": __post_init__})
    options.__module__ = __name__
    return options


def peft_values(method: adapters.PeftMethod, config: Any) -> dict[str, Any]:
    """The options as PEFT's config takes them: names separated by commas are a list where PEFT takes one (PEFT
    would read a string as a regular expression), but "all-linear"."""
    listed = {o.name for o in method.options if "list[str]" in o.types}
    values = {}
    for name, value in dataclasses.asdict(config).items():
        if name in listed and isinstance(value, str) and value != "all-linear":
            value = [v.strip() for v in value.split(",") if v.strip()]
        values[name] = value
    return values


def build_peft_config(method: adapters.PeftMethod, values: dict[str, Any], task_type: str):
    """PEFT's config class built from ``values``; what it refuses is a ValueError naming PEFT's reason."""
    import peft

    for option in method.options:
        value = values.get(option.name)
        if option.choices and isinstance(value, str) and value not in option.choices:
            raise ValueError(f"{option.name} must be one of {', '.join(option.choices)}, not {value!r}")
    fitted_later = {name for kind, name in {**DIVIDES, **AT_MOST} if kind == method.peft_type}
    values = {k: v for k, v in values.items() if v is not None or k not in fitted_later}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's advice on values a user chose
            return getattr(peft, method.config_class)(task_type=task_type, **values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"PEFT's {method.config_class} refuses them: {exc}") from None


@functools.cache
def strategies() -> tuple[PeftMethodStrategy, ...]:
    """One strategy per method of the installed PEFT, but those of `BUILT_IN` and `NOT_REGISTERED` and those PEFT
    cannot build from its own defaults; made once (the registry is built again and again)."""
    made = []
    for method in adapters.peft_methods():
        if method.peft_type in BUILT_IN or method.peft_type in NOT_REGISTERED or method.unusable:
            continue
        merges = method.merges and "merge" not in LIMITS.get(strategy_name(method.peft_type), {})
        made.append((MergingPeftMethodStrategy if merges else PeftMethodStrategy)(method))
    return tuple(made)


def strategy_name(peft_type: str) -> str:
    """A PEFT type's strategy name: ``PROMPT_TUNING`` -> ``prompt-tuning``."""
    return peft_type.lower().replace("_", "-")


@adapters.hookimpl
def register_strategies(register):
    try:
        made = strategies()
    except adapters.AdaptersError as exc:  # PEFT is broken here: everything else still works
        warnings.warn(f"the PEFT methods are not available: {exc}", stacklevel=2)
        return
    for strategy in made:
        register(strategy)
