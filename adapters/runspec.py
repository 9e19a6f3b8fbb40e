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
    model: ModelSpec
    dataset: Dataset | None  # None when resolved without data
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


class StrategyRefused(AdaptersError):
    """The run asks for what its strategy declares it cannot do: a quantization, a task, or
    gradient checkpointing. train stops with it; plan and bench show it as a row."""

    def __init__(self, message: str, strategy: Strategy, quantization: str) -> None:
        super().__init__(message)
        self.strategy = strategy
        self.quantization = quantization


def check_supported(strategy: Strategy, quantization: str, task: str, gradient_checkpointing: bool,
                    registry: Registry) -> None:
    """Raise `StrategyRefused` for anything ``strategy`` declares it cannot do."""
    if quantization not in strategy.supported_quantization:
        others = [e.strategy.name for e in registry.entries() if quantization in e.strategy.supported_quantization]
        message = (f"strategy {strategy.name!r} cannot train on a {quantization}-quantized base "
                   f"(it supports: {', '.join(sorted(strategy.supported_quantization))}). "
                   f"Use --quantization none, or a strategy that can: {', '.join(others) or 'none installed'}.")
    elif task not in strategy.supported_tasks:
        message = (f"strategy {strategy.name!r} does not support --task {task} "
                   f"(it supports: {', '.join(sorted(strategy.supported_tasks))}). Choose another strategy or task.")
    elif gradient_checkpointing and not traits(strategy).supports_gradient_checkpointing:
        message = f"strategy {strategy.name!r} cannot be combined with --gradient-checkpointing. Drop that flag."
    else:
        return
    raise StrategyRefused(message, strategy, quantization)


def resolve(spec: RunSpec, *, data: bool = True) -> Run:
    """Check everything a user can get wrong in ``spec``, before any model is loaded.

    Typos (an unknown strategy, quantization, option or model, a count below 1) come first; then
    what the strategy declares it cannot do (`StrategyRefused`); then the output directory and the
    data, unless ``data=False`` (plan, and bench's parent process, which need no dataset).
    """
    from . import data as datasets
    from .host import get_registry
    from .models import check_model_task, resolve_model
    from .store import check_output_dir

    registry = get_registry()
    name, quantization = split_strategy(spec.strategy, spec.quantization)
    entry = registry.entry(name)
    strategy = entry.strategy
    quantization = quantization or traits(strategy).default_quantization
    check_known_quantization(quantization)
    config = build_config(strategy.config_class, spec.options, strategy.name)
    check_at_least(1, max_steps=spec.max_steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
                   gradient_accumulation_steps=spec.gradient_accumulation_steps)
    model = resolve_model(spec.model)
    task = check_model_task(model, spec.task)
    check_supported(strategy, quantization, task, spec.gradient_checkpointing, registry)
    if spec.output:
        check_output_dir(spec.output, spec.overwrite)
    dataset = datasets.load_dataset(spec.data, task) if data else None
    lr = spec.learning_rate or traits(strategy).default_learning_rate
    return Run(spec, strategy, entry.plugin, config, quantization, task, model, dataset, lr)
