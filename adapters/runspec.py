"""One run specification, and the one `resolve` that checks it before any model is loaded.

`RunSpec` is what a run is: the model, the strategy and its options, the data and the batch. train
runs one; bench measures one per strategy (in a subprocess, which gets the spec as JSON); plan
predicts one per strategy; the kit checks one per cell. Each of them calls `resolve`, so every
check of user input is written here once, and fails before long work starts.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .contract import LR_SCHEDULERS, QUANTIZATIONS, RefusesModels, Strategy, traits
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
    # A file, a save_to_disk directory or builtin:NAME (see adapters.data); from Python also a datasets.Dataset or an
    # iterable of dicts, which the run records as "<KIND: N rows>". None: the built-in real-text dataset for the task.
    data: str | os.PathLike[str] | Iterable[dict[str, Any]] | None = None
    packing: bool | None = None  # instruction/chat data: several examples a row; None: adapters.data.DEFAULT_PACKING
    train_on_prompt: bool = False  # instruction/chat data: train on the prompts' tokens too, not the completions' alone
    max_steps: int = 20  # optimizer steps
    batch_size: int = 4  # per device, per micro-step
    gradient_accumulation_steps: int = 1
    seq_len: int = 128
    learning_rate: float | None = None  # None: the strategy's default
    lr_scheduler: str | None = None  # constant, linear or cosine; None: the strategy's default (cosine)
    warmup_steps: int | None = None  # or warmup_ratio, not both; None: the strategy's default ratio (0)
    warmup_ratio: float | None = None
    weight_decay: float | None = None  # None: the strategy's default (0)
    max_grad_norm: float | None = None  # None: the strategy's default (1.0); 0 turns clipping off
    gradient_checkpointing: bool = False
    # Causal-LM training: the loss in chunks of this many tokens, each chunk's logits made through the model's own
    # output head and dropped again (recomputed in backward); 0: the model's own loss over the full logits;
    # None: adapters.loss.DEFAULT_CHUNK.
    loss_chunk: int | None = None
    compile: bool | None = None  # torch.compile each decoder layer (regional); None: the device's default
    # Fit the run into SIZE (e.g. "6GiB"): the planner picks micro-batch, gradient checkpointing and accumulation,
    # keeping the effective batch (batch_size x gradient_accumulation_steps); None: run as given.
    memory_limit: str | None = None
    # "fsdp": shard parameters, gradients and optimizer states across the processes (FSDP2 through Accelerate,
    # one unit per decoder layer), set up for torchrun as `accelerate launch --use_fsdp` does; "none": each process
    # holds the whole model (data parallelism).
    sharding: str = "none"
    seed: int = 0
    eval_batches: int = 8  # held-out batches evaluated before and after training, and at each --eval-every
    eval_every: int | None = None  # also evaluate every N optimizer steps
    log_every: int = 10  # optimizer steps between lines of metrics.jsonl (and the last step)
    save_every: int | None = None  # write OUTPUT/checkpoints/step-N every N optimizer steps
    keep_checkpoints: int | None = None  # keep the newest K checkpoints; None: all
    report_to: list[str] = field(default_factory=list)  # Accelerate trackers: tensorboard, wandb, mlflow, ...
    output: str | None = None
    overwrite: bool = False
    resume: bool = False  # continue from the newest complete checkpoint in `output`
    allow_other_base: bool = False  # resume onto a base whose weights differ from the checkpoint's
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
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    # With --memory-limit: what `adapters.plan.fit` chose and why (JSON); ``spec`` then holds the choice.
    fit: dict[str, Any] | None = None


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
                    registry: Registry, model_config: Any = None) -> None:
    """Raise `StrategyRefused` for anything ``strategy`` declares it cannot do, the model whose
    transformers config is ``model_config`` included (`RefusesModels`)."""
    model_refusal = strategy.refuses_model(model_config) if (
        model_config is not None and isinstance(strategy, RefusesModels)) else None
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
    elif model_refusal:
        message = (f"strategy {strategy.name!r} cannot apply to {getattr(model_config, 'model_type', 'this')} "
                   f"models: {model_refusal.rstrip('.')}. Choose another strategy or model.")
    else:
        return
    raise StrategyRefused(message, strategy, quantization)


def resolve(spec: RunSpec, *, data: bool = True) -> Run:
    """Check everything a user can get wrong in ``spec``, before any model is loaded.

    Typos (an unknown strategy, quantization, option or model, a count below 1, a size) come first;
    then what the strategy declares it cannot do (`StrategyRefused`); then the output directory and
    the data, unless ``data=False`` (plan, and bench's parent process, which need no dataset). Last,
    with ``memory_limit``, the fit (`adapters.plan.fit`): the run comes back with the micro-batch,
    accumulation and checkpointing chosen, and ``Run.fit`` saying why; nothing fitting is
    `adapters.plan.fit.MemoryLimitTooSmall`, a `StrategyRefused`.
    """
    from . import data as datasets
    from .host import get_registry
    from .models import check_model_task, model_config, resolve_model

    registry = get_registry()
    name, quantization = split_strategy(spec.strategy, spec.quantization)
    entry = registry.entry(name)
    strategy = entry.strategy
    quantization = quantization or traits(strategy).default_quantization
    check_known_quantization(quantization)
    config = build_config(strategy.config_class, spec.options, strategy.name)
    check_at_least(1, max_steps=spec.max_steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
                   gradient_accumulation_steps=spec.gradient_accumulation_steps)
    check_at_least(0, eval_batches=spec.eval_batches, seed=spec.seed)  # 0 batches: the held-out loss is not measured
    if spec.loss_chunk is not None:  # 0: the model's own loss over the whole batch's logits
        check_at_least(0, loss_chunk=spec.loss_chunk)
    if spec.seed >= 2**32:  # what torch, numpy and random all accept
        raise AdaptersError(f"--seed must be below 2**32 ({2**32}), not {spec.seed}.")
    limit = memory_limit(spec.memory_limit)
    check_sharding(spec.sharding, quantization, spec.compile)
    model = resolve_model(spec.model)
    task = check_model_task(model, spec.task)
    hf_config = model_config(spec.model)
    check_supported(strategy, quantization, task, spec.gradient_checkpointing, registry, hf_config)
    optimization = _optimization(spec, strategy)
    _check_run_outputs(spec)
    dataset = datasets.load_dataset(spec.data, task) if data else None
    if dataset is not None:
        _check_model_fits(spec.model, strategy, config, hf_config, task, dataset.labels)
        spec = _settle_data(spec, dataset, task)
    run = Run(spec, strategy, entry.plugin, config, quantization, task, model, dataset, **optimization)
    if limit is not None:  # the planner chooses the micro-batch, checkpointing and accumulation
        from .plan.fit import fit_spec

        run = fit_spec(run, limit)
    return run


SHARDINGS = ("none", "fsdp")


def check_sharding(sharding: str, quantization: str, compile: bool | None) -> None:
    """--sharding: known, and not with what FSDP cannot shard here."""
    if sharding not in SHARDINGS:
        raise AdaptersError(f"--sharding {sharding!r} is not one of: {', '.join(SHARDINGS)}.")
    if sharding == "fsdp" and quantization != "none":
        raise AdaptersError(
            f"--sharding fsdp cannot shard a {quantization}-quantized base: bitsandbytes' packed weights need "
            "FSDP-QLoRA's storage settings (bnb_4bit_quant_storage in the weights' dtype, on CUDA), which adapters "
            "does not set up yet. Use --quantization none, or drop --sharding fsdp (data parallelism).")
    if sharding == "fsdp" and compile:
        raise AdaptersError("--sharding fsdp with --compile is not supported yet: drop --compile.")


def memory_limit(size: str | None) -> int | None:
    """--memory-limit in bytes (None: not given); a size that cannot be read, or is not positive, names the flag."""
    from .text import parse_size

    if size is None:
        return None
    try:
        limit = parse_size(str(size))
    except AdaptersError as exc:
        raise AdaptersError(f"--memory-limit: {exc}") from None
    if limit < 1:
        raise AdaptersError(f"--memory-limit {size}: give a size above 0, e.g. --memory-limit 6GiB.")
    return limit


def _check_model_fits(name: str, strategy: Strategy, config: Any, hf_config: Any, task: str,
                      labels: list[str]) -> None:
    """For a run about to train on its data, what only the model can tell, still before any weight
    loads: a classification checkpoint must have the data's labels, and the strategy must apply to
    the model's weightless skeleton (`adapters.plan.skeleton.check_applies`), so that target_modules
    matching nothing fail here. (Plan estimates from the skeleton itself; bench's workers train.)"""
    from .loading import check_labels
    from .plan.skeleton import check_applies

    if task == "sequence-classification":
        check_labels(name, labels)
    check_applies(strategy, config, hf_config, task, len(labels) or 2)


def _settle_data(spec: RunSpec, dataset: Dataset, task: str) -> RunSpec:
    """The spec as the run records it (checkpoints, the manifest, trackers: JSON): data given as an object by its
    description (`Dataset.name`), a path as a string, and packing decided."""
    from .data import DEFAULT_PACKING

    if task == "sequence-classification":
        for name in ("packing", "train_on_prompt"):
            if getattr(spec, name):
                raise AdaptersError(f"--{name.replace('_', '-')} applies to causal-lm data; sequence classification "
                                    "trains one padded example a row on its label. Drop it.")
    data = os.fspath(spec.data) if isinstance(spec.data, (str, os.PathLike)) else dataset.name
    packing = (task == "causal-lm" and DEFAULT_PACKING) if spec.packing is None else spec.packing
    return dataclasses.replace(spec, data=None if spec.data is None else data, packing=packing)


def _optimization(spec: RunSpec, strategy: Strategy) -> dict[str, Any]:
    """The learning rate, schedule, warm-up, weight decay and clipping: given, or the strategy's defaults."""
    declared = traits(strategy)
    lr = declared.default_learning_rate if spec.learning_rate is None else spec.learning_rate
    if not (math.isfinite(lr) and lr > 0):
        raise AdaptersError(f"--learning-rate {lr}: must be a positive number (0 would train nothing), "
                            "e.g. --learning-rate 1e-4.")
    scheduler = spec.lr_scheduler or declared.default_lr_scheduler
    if scheduler not in LR_SCHEDULERS:
        raise AdaptersError(f"--lr-scheduler {scheduler}: use one of {', '.join(LR_SCHEDULERS)}.")
    if spec.warmup_steps is not None and spec.warmup_ratio is not None:
        raise AdaptersError("give --warmup-steps or --warmup-ratio, not both.")
    if spec.warmup_steps is not None:
        check_at_least(0, warmup_steps=spec.warmup_steps)
        warmup = spec.warmup_steps
    else:
        ratio = declared.default_warmup_ratio if spec.warmup_ratio is None else spec.warmup_ratio
        if not 0 <= ratio < 1:  # also false for NaN
            raise AdaptersError(f"--warmup-ratio {ratio}: must be at least 0 and below 1, e.g. 0.05.")
        warmup = math.ceil(ratio * spec.max_steps)
    values = {"weight_decay": declared.default_weight_decay if spec.weight_decay is None else spec.weight_decay,
              "max_grad_norm": declared.default_max_grad_norm if spec.max_grad_norm is None else spec.max_grad_norm}
    for name, value in values.items():
        if not (math.isfinite(value) and value >= 0):
            raise AdaptersError(f"--{name.replace('_', '-')} {value}: must be 0 or more.")
    return {"learning_rate": lr, "lr_scheduler": scheduler, "warmup_steps": warmup, **values}


def _check_run_outputs(spec: RunSpec) -> None:
    """Periodic work, trackers and the output directory: all checked before anything loads."""
    from .store import check_output_dir

    for name in ("eval_every", "save_every", "keep_checkpoints"):
        if getattr(spec, name) is not None:
            check_at_least(1, **{name: getattr(spec, name)})
    check_at_least(1, log_every=spec.log_every)
    _check_trackers(spec.report_to)
    if spec.save_every is not None and not spec.output:
        raise AdaptersError("--save-every writes checkpoints into --output: give --output DIR.")
    if spec.resume:
        from .checkpoints import latest_checkpoint

        if not spec.output or latest_checkpoint(spec.output) is None:
            raise AdaptersError(f"--resume {spec.output}: no complete checkpoint there. Give the --output "
                                "directory of a run that was started with --save-every.")
    elif spec.output:
        check_output_dir(spec.output, spec.overwrite)


def _check_trackers(names: list[str]) -> None:
    if not names:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise AdaptersError(f"--report-to {name}: unknown tracker. Use one of: {', '.join(LOGGER_TYPE_TO_CLASS)}.")
        if name not in available:
            raise AdaptersError(f"--report-to {name}: its package is not installed. Install it (pip install {name}), "
                                "or drop --report-to.")
