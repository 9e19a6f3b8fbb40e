"""Running the checks: `run_checks` (a report), `assert_conforms` (a failed test) and `cases` (for parametrize)."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import tempfile
import traceback
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..contract import QUANTIZATIONS, TASKS, Strategy, traits, validate_strategy
from ..errors import AdaptersError
from .catalog import REGISTRY, Check
from .fixtures import plugin_for, registered
from .harness import TINY_MODEL, Harness, Skip, reproducible
from .report import FAIL, PASS, SKIP, CheckReport, CheckResult, ConformanceError


class _Runner:
    """Runs the registry's checks on one harness, in order, into result rows."""

    def __init__(self, harness: Harness, optional: Iterable[str] = ()) -> None:
        self.h = harness
        self.checks = [c for c in REGISTRY.values() if not c.optional or c.name in set(optional)]
        self.results: list[CheckResult] = []
        self.blocked: dict[tuple, str] = {}  # (task, quantization) -> the required check that failed there

    def record(self, check: Check, task: str | None = None, quantization: str | None = None) -> CheckResult:
        tb = None
        try:
            if (task, quantization) in self.blocked:
                raise Skip(f"the {self.blocked[task, quantization]} check failed")
            detail = check.fn(self.h) if task is None else check.fn(self.h, task, quantization)
            status = PASS
        except Skip as skip:
            status, detail = SKIP, str(skip)
        except Exception as exc:  # noqa: BLE001 - a check reports every error as a failure
            status = FAIL
            # A finding (AssertionError) says what is wrong; anything else is named by its type.
            detail = (str(exc) or "assertion failed") if isinstance(exc, AssertionError) else \
                f"{type(exc).__name__}: {exc}"
            tb = "".join(traceback.format_exception(exc))
        result = CheckResult(check.name, status, task, quantization, " ".join(str(detail or "").split()), tb)
        self.results.append(result)
        if status == FAIL and check.required:
            self.blocked[task, quantization] = check.name
        return result

    def run_all(self) -> list[CheckResult]:
        """Each check in registry order; consecutive per-cell and per-task checks share one sweep of the cells.

        A failed required check that runs once ends the run.
        """
        for per_strategy, group in itertools.groupby(self.checks, key=lambda c: c.each == "strategy"):
            if not per_strategy:
                self.sweep(list(group))
                continue
            for check in group:
                if self.record(check).status == FAIL and check.required:
                    return self.results
        return self.results

    def sweep(self, checks: list[Check]) -> None:
        """The checks for each cell of each task (declared or not), then those for the task."""
        h, strategy = self.h, self.h.strategy
        preferred = h.preferred_quantization()
        for task in h.tasks:
            for quantization in h.quantizations:
                declared = task in strategy.supported_tasks and quantization in strategy.supported_quantization
                for check in checks:
                    if check.each == ("cell" if declared else "undeclared-cell"):
                        self.record(check, task, quantization)
                # Free the models; the per-task checks compare with the first run on the preferred quantization.
                h.release(task, quantization, keep_first=quantization == preferred)
            if task in strategy.supported_tasks and preferred is not None:
                for check in checks:
                    if check.each == "task":
                        self.record(check, task, preferred)
                h.release(task, preferred)


def _resolve_strategy(strategy: str | Strategy) -> tuple[Strategy, str, bool]:
    """(strategy object, plugin name, whether it must be registered for the run)."""
    from ..host import get_registry

    registry = get_registry()
    if isinstance(strategy, str):
        entry = registry.entry(strategy)
        return entry.strategy, entry.plugin, False
    name = getattr(strategy, "name", None)
    entry = registry.find(name) if isinstance(name, str) else None
    if entry is not None:
        # The same class registered already (the plugin under test is installed, too) is fine.
        if entry.strategy is not strategy and type(entry.strategy) is not type(strategy):
            raise AdaptersError(f"a different strategy named {name!r} is already registered by plugin "
                                f"{entry.plugin!r}; check that one by name, or rename this one.")
        return strategy, entry.plugin, False
    return strategy, f"adapters-testing-{name}", True


def _options(strategy: Strategy) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dataclasses.asdict(strategy.config_class()), allow_nan=False))
    except Exception:  # noqa: BLE001 - reported by the config-defaults check
        return {}


def _checked(values: Iterable[str] | None, known: tuple[str, ...], what: str) -> list[str]:
    chosen = list(values) if values is not None else list(known)
    for value in chosen:
        if value not in known:
            raise AdaptersError(f"unknown {what} {value!r}. Use one of: {', '.join(known)}.")
    return chosen


def run_checks(
    strategy: str | Strategy,
    *,
    quantizations: Iterable[str] | None = None,
    tasks: Iterable[str] | None = None,
    model: str = TINY_MODEL,
    seed: int = 0,
    device: str = "cpu",
    optional: Iterable[str] = (),
) -> CheckReport:
    """Run every conformance check on ``strategy`` (a registered name, or a strategy object).

    ``quantizations`` and ``tasks`` narrow the run (default: all of them; those the strategy does
    not declare are checked for a clear refusal). ``optional`` adds the optional checks named (``"distributed"``).
    A strategy object that is not registered is registered for the duration of the run. Nothing is
    cached between runs.
    """
    from ..models import quiet_transformers

    optional = _checked(optional, tuple(c.name for c in REGISTRY.values() if c.optional), "optional check")
    quantizations = _checked(quantizations, QUANTIZATIONS, "quantization")
    tasks = _checked(tasks, TASKS, "task")
    if not isinstance(strategy, str):
        problems = validate_strategy(strategy)
        if problems:  # it cannot even be registered; report the declaration and stop
            name = str(getattr(strategy, "name", type(strategy).__name__))
            return CheckReport(name, "-", [], [], False, {}, str(getattr(strategy, "description", "")),
                               [CheckResult("declaration", FAIL, detail="; ".join(problems))])
    obj, plugin, needs_registering = _resolve_strategy(strategy)
    report = CheckReport(
        obj.name, plugin, sorted(obj.supported_quantization), sorted(obj.supported_tasks),
        bool(traits(obj).supports_gradient_checkpointing), _options(obj), obj.description,
    )
    with contextlib.ExitStack() as stack:
        if needs_registering:
            stack.enter_context(registered(plugin_for(obj), name=plugin))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adapters-check-")))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # library chatter (PEFT, bitsandbytes) is not a result
        stack.enter_context(quiet_transformers())
        stack.enter_context(reproducible())  # one thread, deterministic algorithms; restored after
        harness = Harness(obj, quantizations, tasks, model, seed, device, workdir)
        harness.registered_here = needs_registering
        report.results = _Runner(harness, optional).run_all()
    return report


def assert_conforms(strategy: str | Strategy, **kwargs: Any) -> CheckReport:
    """`run_checks`, raising `ConformanceError` (an AssertionError listing the failing rows) on any failure."""
    report = run_checks(strategy, **kwargs)
    if not report.passed:
        raise ConformanceError(report)
    return report


def cases(strategy: str | Strategy) -> list[tuple[str, str]]:
    """Every (task, quantization) the strategy declares, for ``pytest.mark.parametrize``."""
    if isinstance(strategy, str):
        from ..host import get_registry

        strategy = get_registry().get(strategy)
    return [(t, q) for t in TASKS if t in strategy.supported_tasks
            for q in QUANTIZATIONS if q in strategy.supported_quantization]
