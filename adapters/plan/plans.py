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

from .. import rules
from ..contract import QUANTIZATIONS, ModelShape, RunShape, Strategy, run_refusal
from ..errors import AdaptersError
from ..host import Registry, get_registry
from ..resolver import resolve
from ..runspec import (
    DEFAULT_STRATEGY,
    RunSpec,
    StrategyRefused,
    check_at_least,
    check_sharding,
    split_strategy,
    with_spec,
)
from ..text import parse_size
from .budget import with_budget
from .memory import RUNTIME_OVERHEAD, Plan, estimate
from .skeleton import model_shape, run_shape


@dataclass
class PlanSettings:
    """What `adapters plan` accepts: the run to plan (`spec`; its strategy is each planned one) and how."""

    spec: RunSpec = field(default_factory=RunSpec)
    strategies: list[str] = field(default_factory=lambda: [DEFAULT_STRATEGY])  # names, NAME@QUANT, or ["all"]
    device: str = "cuda"  # the device planned for: "cuda", bf16 under autocast; "cpu", float32
    budget: str | None = None  # a size to fit: a verdict, and the largest batch and sequence that fit
    processes: int = 1  # the plan is one process's peak of a run of this many, each with the spec's batch_size rows

    @classmethod
    def of(cls, **values: Any) -> PlanSettings:
        """Settings from flat values: `RunSpec` fields (``model``, ``batch_size``, ...) and plan's own."""
        return with_spec(cls, values, "plan")


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
    s = settings.spec
    if settings.device not in RUNTIME_OVERHEAD:
        raise AdaptersError(f"--device {settings.device}: use cuda or cpu.")
    budget = parse_size(settings.budget) if settings.budget else None
    check_at_least(1, processes=settings.processes, batch_size=s.batch_size, seq_len=s.seq_len)
    check_sharding(s.sharding, "none", s.compile)  # the name; a quantized base is a refused row (`_asked`)
    if s.offload_activations and (reason := rules.offload_refusal(settings.device)):
        raise AdaptersError(f"--device {settings.device}: {reason}")
    if s.optimizer_in_backward and (reason := rules.in_backward_refusal(sharding=s.sharding,
                                                                       processes=settings.processes)):
        raise AdaptersError(reason)
    registry = get_registry()
    asked = _asked(settings, registry)  # every name and option checked before any model is built
    shape = model_shape(s.model, s.task, settings.device)
    plans = []
    for one in asked:
        run = run_shape(s, shape.task, one.quantization, settings.device, processes=settings.processes)
        plans.append(_plan(one, shape, run, budget))
    engine = run_shape(s, shape.task, "none", settings.device).engine  # the same for every quantization
    return {
        "model": s.model, "task": shape.task, "device": settings.device,
        "dtype": rules.base_dtype(settings.device, s.master_weights, s.mixed_precision)
        + (" (autocast)" if rules.autocasts(settings.device, s.mixed_precision) else ""),
        "batch_size": s.batch_size, "seq_len": s.seq_len,
        "gradient_checkpointing": s.gradient_checkpointing, "checkpoint_layers": s.checkpoint_layers,
        "offload_activations": s.offload_activations,
        "optimizer_in_backward": s.optimizer_in_backward, "master_weights": s.master_weights,
        "mixed_precision": s.mixed_precision,
        "loss": engine.loss_path,
        "processes": settings.processes, "sharding": s.sharding,
        "budget_bytes": budget, "engine": engine.to_dict(),
        "plans": [p.to_dict() for p in plans], "seconds": round(time.perf_counter() - started, 3),
    }


def _specs(settings: PlanSettings, registry: Registry) -> list[str]:
    """Strategy specs to plan: "all" expands to every strategy (aliases are other names for one of
    them) on every quantization it supports (on the spec's quantization alone, when it has one)."""
    if settings.strategies == ["all"]:
        wanted = [settings.spec.quantization] if settings.spec.quantization else QUANTIZATIONS
        return [e.strategy.name if q == "none" else f"{e.strategy.name}@{q}" for e in registry.entries(aliases=False)
                for q in wanted if q in e.strategy.supported_quantization]
    quantization = settings.spec.quantization
    if quantization:  # each planned as NAME@QUANT; one that says another quantization is an error
        return [f"{split_strategy(spec, quantization)[0]}@{quantization}" for spec in settings.strategies]
    return list(settings.strategies)


def _asked(settings: PlanSettings, registry: Registry) -> list[_Asked]:
    """Each strategy asked for, resolved as a run of ``settings``; a typo is an error, a refusal a row."""
    specs = _specs(settings, registry)
    if not specs:
        raise AdaptersError("--strategy is empty. Name one, e.g. --strategy lora, or --strategies all.")
    strategies = [registry.get(split_strategy(spec, None)[0]) for spec in specs]
    options = settings.spec.options
    several = len(specs) > 1
    if several:
        _check_shared_options(options, strategies)
    asked = []
    for spec, strategy in zip(specs, strategies):
        # Sharding's own refusal (a quantized base) is a row of its own (`_sharding_refusal`), not an error.
        run_spec = dataclasses.replace(settings.spec, strategy=spec, sharding="none",
                                       options=_accepted(strategy, options) if several else dict(options))
        try:
            run = resolve(run_spec, data=False)
        except StrategyRefused as refused:
            asked.append(_Asked(spec, refused.strategy, refused.quantization, refusal=str(refused)))
        else:
            asked.append(_Asked(spec, run.strategy, run.quantization, run.config, _sharding_refusal(settings, run)))
    return asked


def _sharding_refusal(settings: PlanSettings, run: Any) -> str | None:
    """Why ``run`` cannot be sharded as ``settings`` ask (a quantized base), as `adapters train` says it."""
    try:
        check_sharding(settings.spec.sharding, run.quantization, None)
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
    refusal = asked.refusal or run_refusal(asked.strategy, asked.config, run)  # `adapters.RefusesRuns`
    if refusal is not None:
        return Plan(asked.spec, asked.strategy.name, asked.quantization, "refused", refusal)
    plan = estimate(shape, asked.strategy, asked.config, run, asked.spec)
    return plan if budget is None else with_budget(plan, shape, asked.strategy, asked.config, run, budget)
