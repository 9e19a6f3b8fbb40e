"""One run specification, and the one `resolve` that checks it before any model is loaded.

`RunSpec` is what a run is: the model, the strategy and its options, the data and the batch. train
runs one; bench measures one per strategy (in a subprocess, which gets the spec as JSON); plan
predicts one per strategy; the kit checks one per cell. Each of them calls `resolve`, so every
check of user input is written here once, and fails before long work starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .contract import QUANTIZATIONS, Strategy, traits
from .errors import AdaptersError
from .options import build_config, read_toml, settings_values

if TYPE_CHECKING:
    from .data import Dataset
    from .host import Registry
    from .models import ModelSpec

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_STRATEGY = "lora"


@dataclass
class RunSpec:
    """Everything one run accepts; CLI flags and TOML config keys use these names."""

    model: str = DEFAULT_MODEL
    strategy: str = DEFAULT_STRATEGY  # a name, or NAME@QUANT
    quantization: str | None = None  # None: the strategy's default (nf4 for qlora, else none)
    task: str | None = None  # None: the model's default task
    data: str | None = None  # None: the built-in real-text dataset for the task
    max_steps: int = 20  # optimizer steps
    batch_size: int = 4  # per device, per micro-step
    gradient_accumulation_steps: int = 1
    seq_len: int = 128
    learning_rate: float | None = None  # None: the strategy's default
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_batches: int = 8  # held-out batches evaluated before and after training
    output: str | None = None
    overwrite: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # strategy options, checked against its config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TrainSettings = RunSpec  # the name before 0.2; `adapters.TrainSettings` keeps working


@dataclass
class Run:
    """A `RunSpec` resolved and checked against the registry, the model and the data."""

    spec: RunSpec
    strategy: Strategy
    plugin: str
    config: Any
    quantization: str
    task: str
    model: ModelSpec | None  # None when resolved for a plan, which reads only the model's config
    dataset: Dataset | None  # None when resolved without data (plan)
    learning_rate: float


def spec_from(config_file: str | None, given: dict[str, Any], options: dict[str, Any]) -> RunSpec:
    """A spec from a TOML file (optional), overridden by ``given`` values and ``options``.

    The file's keys are `RunSpec` field names (hyphens or underscores); strategy options go in an
    ``[options]`` table.
    """
    values: dict[str, Any] = {}
    file_options: dict[str, Any] = {}
    if config_file:
        table = read_toml(config_file)
        file_options = table.pop("options", {})
        if not isinstance(file_options, dict):
            raise AdaptersError(f"--config {config_file}: `options` must be a table, e.g. [options] r = 8.")
        values = settings_values(table, RunSpec, f"--config {config_file}", nested=("options",))
    values.update(given)
    return RunSpec(**values, options={**file_options, **options})


def split_strategy(spec: str, quantization: str | None) -> tuple[str, str | None]:
    """``"lora@nf4"`` -> ``("lora", "nf4")``; a conflicting --quantization is an error."""
    name, at, quant = spec.partition("@")
    if not at:
        return name, quantization
    if quantization is not None and quantization != quant:
        raise AdaptersError(
            f"--strategy {spec} asks for {quant} but --quantization says {quantization}. Give only one of them."
        )
    return name, quant


def check_at_least(minimum: int, **values: int) -> None:
    """Each flag (given by its field name) is at least ``minimum``."""
    for name, value in values.items():
        if value < minimum:
            raise AdaptersError(f"--{name.replace('_', '-')} must be at least {minimum}, not {value}.")


def check_known_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise AdaptersError(f"unknown quantization {quantization!r}. Use one of: {', '.join(QUANTIZATIONS)}.")


def check_quantization(strategy: Strategy, quantization: str, registry: Registry) -> None:
    """``quantization`` is known and ``strategy`` supports it."""
    check_known_quantization(quantization)
    if quantization not in strategy.supported_quantization:
        others = [e.strategy.name for e in registry.entries() if quantization in e.strategy.supported_quantization]
        raise AdaptersError(
            f"strategy {strategy.name!r} cannot train on a {quantization}-quantized base "
            f"(it supports: {', '.join(sorted(strategy.supported_quantization))}). "
            f"Use --quantization none, or a strategy that can: {', '.join(others) or 'none installed'}."
        )


def check_combination(strategy: Strategy, task: str, gradient_checkpointing: bool) -> None:
    """What the strategy declares it cannot do: a task, or gradient checkpointing."""
    if task not in strategy.supported_tasks:
        raise AdaptersError(
            f"strategy {strategy.name!r} does not support --task {task} "
            f"(it supports: {', '.join(sorted(strategy.supported_tasks))}). Choose another strategy or task."
        )
    if gradient_checkpointing and not traits(strategy).supports_gradient_checkpointing:
        raise AdaptersError(
            f"strategy {strategy.name!r} cannot be combined with --gradient-checkpointing. Drop that flag."
        )


def resolve_strategy(name: str, quantization: str | None = None,
                     registry: Registry | None = None) -> tuple[Strategy, str, str]:
    """(strategy, plugin, quantization) for ``NAME`` or ``NAME@QUANT``, the quantization checked."""
    from .host import get_registry

    registry = registry or get_registry()
    name, quantization = split_strategy(name, quantization)
    entry = registry.entry(name)
    quantization = quantization or traits(entry.strategy).default_quantization
    check_quantization(entry.strategy, quantization, registry)
    return entry.strategy, entry.plugin, quantization


def resolve(spec: RunSpec, *, data: bool = True, model: bool = True) -> Run:
    """Check everything a user can get wrong in ``spec``, before any model is loaded.

    ``data=False`` skips loading the dataset; ``model=False`` (plan) skips resolving the model
    name to a checkpoint and takes ``spec.task`` as given.
    """
    from . import data as datasets
    from .models import check_model_task, resolve_model
    from .store import check_output_dir

    strategy, plugin, quantization = resolve_strategy(spec.strategy, spec.quantization)
    check_at_least(1, max_steps=spec.max_steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
                   gradient_accumulation_steps=spec.gradient_accumulation_steps)
    model_spec = resolve_model(spec.model) if model else None
    task = check_model_task(model_spec, spec.task) if model_spec else (spec.task or "causal-lm")
    check_combination(strategy, task, spec.gradient_checkpointing)
    config = build_config(strategy.config_class, spec.options, strategy.name)
    if spec.output:
        check_output_dir(spec.output, spec.overwrite)
    dataset = datasets.load_dataset(spec.data, task) if data else None
    lr = spec.learning_rate or traits(strategy).default_learning_rate
    return Run(spec, strategy, plugin, config, quantization, task, model_spec, dataset, lr)
