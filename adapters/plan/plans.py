"""`adapters plan` as a library call: every strategy asked for is checked, then planned on one skeleton.

Typos (an unknown strategy, an option no planned strategy has) are errors before any model is built;
what a strategy declares it cannot do (a quantization, the task, gradient checkpointing) is a
"refused" plan with the resolver's message, so that one table can show every strategy.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from ..contract import QUANTIZATIONS, ModelShape, RunShape, Strategy
from ..errors import AdaptersError
from ..host import Registry, get_registry
from ..runspec import DEFAULT_MODEL, DEFAULT_STRATEGY, RunSpec, StrategyRefused, resolve, split_strategy
from ..text import parse_size
from .activations import loss_path
from .budget import with_budget
from .memory import RUNTIME_OVERHEAD, Plan, estimate
from .skeleton import model_shape


@dataclass
class PlanSettings:
    """What `adapters plan` accepts."""

    model: str = DEFAULT_MODEL
    strategies: list[str] = field(default_factory=lambda: [DEFAULT_STRATEGY])  # names, NAME@QUANT, or ["all"]
    batch_size: int = 4
    seq_len: int = 512
    task: str | None = None
    gradient_checkpointing: bool = False
    loss_chunk: int | None = None  # as RunSpec.loss_chunk: None, train's default chunk; 0, the model's own loss
    device: str = "cuda"
    options: dict[str, Any] = field(default_factory=dict)
    budget: str | None = None
    processes: int = 1  # the plan is one process's peak, each with batch_size rows
    sharding: str = "none"  # as RunSpec.sharding


@dataclass
class _Asked:
    """One strategy as asked for, resolved; or refused, with the reason."""

    spec: str  # as asked, e.g. "lora@nf4"
    strategy: Strategy
    quantization: str
    config: Any = None
    refusal: str | None = None


def make_plans(settings: PlanSettings) -> dict[str, Any]:
    """Plan every strategy in ``settings``: the library function behind `adapters plan`."""
    started = time.perf_counter()
    if settings.device not in RUNTIME_OVERHEAD:
        raise AdaptersError(f"--device {settings.device}: use cuda or cpu.")
    budget = parse_size(settings.budget) if settings.budget else None
    _check_processes(settings)
    registry = get_registry()
    asked = _asked(settings, registry)  # every name and option checked before any model is built
    shape = model_shape(settings.model, settings.task, settings.device)
    plans = []
    for one in asked:
        run = RunShape(settings.batch_size, settings.seq_len, shape.task, one.quantization,
                       settings.gradient_checkpointing, settings.device, settings.loss_chunk,
                       processes=settings.processes, sharding=settings.sharding)
        plans.append(_plan(one, shape, run, budget))
    return {
        "model": settings.model, "task": shape.task, "device": settings.device,
        "dtype": "bfloat16 (autocast)" if settings.device == "cuda" else "float32",
        "batch_size": settings.batch_size, "seq_len": settings.seq_len,
        "gradient_checkpointing": settings.gradient_checkpointing, "loss": loss_path(shape, settings.loss_chunk),
        "processes": settings.processes, "sharding": settings.sharding,
        "budget_bytes": budget,
        "plans": [p.to_dict() for p in plans], "seconds": round(time.perf_counter() - started, 3),
    }


def _check_processes(settings: PlanSettings) -> None:
    """--processes and --sharding, checked as `adapters train` checks them."""
    from ..runspec import check_at_least, check_sharding

    check_at_least(1, processes=settings.processes)
    check_sharding(settings.sharding, "none", None)  # the name; a quantized base is a refused row (`_asked`)


def _specs(settings: PlanSettings, registry: Registry) -> list[str]:
    """Strategy specs to plan: "all" expands to every strategy (aliases are other names for one of
    them) on every quantization it supports."""
    if settings.strategies == ["all"]:
        return [e.strategy.name if q == "none" else f"{e.strategy.name}@{q}" for e in registry.entries(aliases=False)
                for q in QUANTIZATIONS if q in e.strategy.supported_quantization]
    return list(settings.strategies)


def _asked(settings: PlanSettings, registry: Registry) -> list[_Asked]:
    """Each strategy asked for, resolved as a run of ``settings``; a typo is an error, a refusal a row."""
    specs = _specs(settings, registry)
    if not specs:
        raise AdaptersError("--strategy is empty. Name one, e.g. --strategy lora, or --strategies all.")
    strategies = [registry.get(split_strategy(spec, None)[0]) for spec in specs]
    several = len(specs) > 1
    if several:
        _check_shared_options(settings.options, strategies)
    asked = []
    for spec, strategy in zip(specs, strategies):
        run_spec = RunSpec(model=settings.model, strategy=spec, task=settings.task, batch_size=settings.batch_size,
                           seq_len=settings.seq_len, gradient_checkpointing=settings.gradient_checkpointing,
                           loss_chunk=settings.loss_chunk,
                           options=_accepted(strategy, settings.options) if several else settings.options)
        try:
            run = resolve(run_spec, data=False)
        except StrategyRefused as refused:
            asked.append(_Asked(spec, refused.strategy, refused.quantization, refusal=str(refused)))
        else:
            asked.append(_Asked(spec, run.strategy, run.quantization, run.config, _sharding_refusal(settings, run)))
    return asked


def _sharding_refusal(settings: PlanSettings, run: Any) -> str | None:
    """Why ``run`` cannot be sharded as ``settings`` ask (a quantized base), as `adapters train` says it."""
    from ..runspec import check_sharding

    try:
        check_sharding(settings.sharding, run.quantization, None)
    except AdaptersError as exc:
        return str(exc)
    return None


def _check_shared_options(options: dict[str, Any], strategies: list[Strategy]) -> None:
    """With several strategies, each takes the --set options its config has; one that none has is a typo."""
    known = {f.name for strategy in strategies for f in dataclasses.fields(strategy.config_class)}
    unknown = sorted(k for k in options if k.replace("-", "_") not in known)
    if unknown:
        raise AdaptersError(f"--set {unknown[0]}: none of the planned strategies has that option. "
                            f"Options they have: {', '.join(sorted(known)) or 'none'}.")


def _accepted(strategy: Strategy, options: dict[str, Any]) -> dict[str, Any]:
    """The --set options ``strategy``'s config has."""
    names = {f.name for f in dataclasses.fields(strategy.config_class)}
    return {k: v for k, v in options.items() if k.replace("-", "_") in names}


def _plan(asked: _Asked, shape: ModelShape, run: RunShape, budget: int | None) -> Plan:
    """One strategy's plan, or its refusal: what it declares it cannot do is a row, not an error."""
    if asked.refusal is not None:
        return Plan(asked.spec, asked.strategy.name, asked.quantization, "refused", asked.refusal)
    plan = estimate(shape, asked.strategy, asked.config, run, asked.spec)
    return plan if budget is None else with_budget(plan, shape, asked.strategy, asked.config, run, budget)
