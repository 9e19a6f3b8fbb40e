"""The one `resolve`: every check of user input, written once, before any weight loads.

train, bench, plan and the kit each resolve the `RunSpec` they run (`adapters.runspec`): typos first (an unknown
strategy, quantization, option or model, a count below 1, a size), then what the strategy declares it cannot do
(`StrategyRefused`), then the output directory and the data. A resumed run's output is `adapters.resuming`'s to
check, which knows what it continues from.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING, Any

from . import rules
from .contract import LR_SCHEDULERS, RefusesModels, Strategy, traits
from .errors import AdaptersError
from .options import build_config
from .runspec import (
    Run,
    RunSpec,
    StrategyRefused,
    check_at_least,
    check_known_quantization,
    check_sharding,
    memory_limit,
    split_strategy,
)

if TYPE_CHECKING:
    from .data import Dataset
    from .host import Registry


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
    _check_counts(spec)
    limit = memory_limit(spec.memory_limit)
    check_sharding(spec.sharding, quantization, spec.compile)
    model = resolve_model(spec.model)
    task = check_model_task(model, spec.task)
    hf_config = model_config(spec.model)
    _check_checkpoint_layers(spec, hf_config)
    check_supported(strategy, quantization, task, spec.gradient_checkpointing, registry, hf_config)
    optimization = _optimization(spec, strategy)
    _check_in_backward(spec, optimization["max_grad_norm"])
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


def _check_counts(spec: RunSpec) -> None:
    check_at_least(1, max_steps=spec.max_steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
                   gradient_accumulation_steps=spec.gradient_accumulation_steps)
    check_at_least(0, eval_batches=spec.eval_batches, seed=spec.seed)  # 0 batches: the held-out loss is not measured
    if spec.loss_chunk is not None:  # 0: the model's own loss over the whole batch's logits
        check_at_least(0, loss_chunk=spec.loss_chunk)
    if spec.seed >= 2**32:  # what torch, numpy and random all accept
        raise AdaptersError(f"--seed must be below 2**32 ({2**32}), not {spec.seed}.")


def _check_checkpoint_layers(spec: RunSpec, hf_config: Any) -> None:
    """--checkpoint-layers N counts decoder layers: at least 1, at most the model's."""
    if spec.checkpoint_layers is None:
        return
    check_at_least(1, checkpoint_layers=spec.checkpoint_layers)
    layers = getattr(hf_config, "num_hidden_layers", None)
    if layers is not None and spec.checkpoint_layers > layers:
        raise AdaptersError(f"--checkpoint-layers {spec.checkpoint_layers}: {spec.model} has {layers} decoder "
                            f"layers. Give at most {layers}, or --gradient-checkpointing alone for all of them.")


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
    # In backward, no gradient norm exists to clip to: the strategy's default clipping gives way, a given one is
    # refused (`_check_in_backward`).
    clip = 0.0 if spec.optimizer_in_backward else declared.default_max_grad_norm
    values = {"weight_decay": declared.default_weight_decay if spec.weight_decay is None else spec.weight_decay,
              "max_grad_norm": clip if spec.max_grad_norm is None else spec.max_grad_norm}
    for name, value in values.items():
        if not (math.isfinite(value) and value >= 0):
            raise AdaptersError(f"--{name.replace('_', '-')} {value}: must be 0 or more.")
    return {"learning_rate": lr, "lr_scheduler": scheduler, "warmup_steps": warmup, **values}


def _check_in_backward(spec: RunSpec, max_grad_norm: float) -> None:
    """--optimizer-in-backward only where it gives the plain step's update (`adapters.rules.in_backward_refusal`)."""
    from .distributed import launched_processes

    if spec.optimizer_in_backward and (reason := rules.in_backward_refusal(
            gradient_accumulation_steps=spec.gradient_accumulation_steps, max_grad_norm=max_grad_norm,
            sharding=spec.sharding, processes=launched_processes())):
        raise AdaptersError(reason)


def _check_run_outputs(spec: RunSpec) -> None:
    """Periodic work, trackers and a new run's output directory: all checked before anything loads."""
    from .store import check_output_dir

    for name in ("eval_every", "save_every", "keep_checkpoints"):
        if getattr(spec, name) is not None:
            check_at_least(1, **{name: getattr(spec, name)})
    check_at_least(1, log_every=spec.log_every)
    _check_trackers(spec.report_to)
    if spec.save_every is not None and not spec.output:
        raise AdaptersError("--save-every writes checkpoints into --output: give --output DIR.")
    if spec.resume and not spec.output:
        raise AdaptersError("--resume needs the run's --output directory: give --resume OUTPUT.")
    if spec.output and not spec.resume:
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
