"""`adapters recommend` as a library call: plan every candidate, measure those that fit, rank them.

The pipeline, each step one that `plan`, `bench` and `compare` already have; recommend adds no way to measure:

1. **Plan.** Every candidate is resolved and fitted into the memory limit (`--memory-limit`, else the device's
   memory) by the planner, as `adapters train --memory-limit` fits a run (`adapters.plan.fit`). One that does not
   fit is *excluded*, with the planner's reason, and never run; one whose strategy cannot do the run (a
   quantization, the task) is *refused*.
2. **Speed.** Each candidate that fits is benchmarked by `adapters bench` in a fresh process: a warm-up step, then
   two repeats of one timed step, for tokens/s with its step-time range and the measured peak. No speed run
   starts after `SPEED_SHARE` of the budget has gone.
3. **Learning.** Each is benchmarked again with ``--quality-steps N``: held-out loss before and after N steps on
   the user's data. N is the same for every candidate (the loss after the same tokens), the largest that the
   rest of the budget allows, from the speed runs' step times and start-up costs (`learning_steps`); or given
   as tokens (``budget_tokens``). Candidates the budget cannot fit at `MIN_LEARNING_STEPS` are dropped, the
   slowest first, and say so.
4. **Rank** (`adapters.recommend.ranking`): compare's noise rules, the Pareto front, the recommendation and why
   every other candidate lost.

The budget is a deadline: a run still going at it is stopped (as Ctrl-C stops bench, keeping what was measured)
and the candidates not measured say so. Everything measured is kept in the output directory: the two bench
reports (``speed.json``, ``learning.json``: `adapters compare` and `adapters report` read them),
``recommend.json`` and ``report.html``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdaptersError
from ..runspec import RunSpec, StrategyRefused, with_spec
from ..text import format_bytes, parse_size

BUILTIN_PLUGINS = ("adapters_lora", "adapters_prefix", "adapters_probe", "adapters_full")
# PEFT's methods tried by default beside the built-ins: the most used after LoRA and prefix tuning.
POPULAR_PEFT = ("ia3", "loha")
# Per candidate, in its speed run: a warm-up step, then two repeats of one timed step, whose two times give the
# range that compare's noise rule reads.
SPEED_STEPS = {"warmup": 1, "steps": 1, "repeats": 2}
SPEED_SHARE = 0.4  # no speed run starts after this share of the budget
MIN_LEARNING_STEPS = 3
MARGIN = 0.85  # the share of the time left that the learning runs are planned to take
# A learning run starts the process and loads the model twice (bench's timed step, then the quality run's own
# train), evaluates the held-out split before and after (eval_batches forward passes each, a third of a step
# each), and runs one timed step and N training steps.
EXTRA_STARTUP = 1.3
FORWARD_SHARE = 1 / 3


@dataclass
class RecommendSettings:
    """What `adapters recommend` accepts: the run every candidate is measured on (`spec`, as bench's) and how."""

    spec: RunSpec = field(default_factory=RunSpec)
    candidates: list[str] | None = None  # None: `default_candidates`
    budget_minutes: float = 10.0
    budget_tokens: int | None = None  # the learning runs' tokens; None: as many as the budget allows
    output: str | None = None  # a new directory [default: recommend-<model>-<time>]

    @classmethod
    def of(cls, **values: Any) -> RecommendSettings:
        return with_spec(cls, values, "bench")


@dataclass
class Candidate:
    """One candidate as recommend saw it: planned, measured, and how it ranked."""

    name: str
    status: str = "planned"  # recommended, measured, excluded, refused, failed, not measured
    reason: str | None = None  # why it lost, or was excluded, refused, failed or not measured
    planned_peak_bytes: int | None = None
    batch_size: int | None = None  # as fitted into the memory limit
    gradient_accumulation_steps: int | None = None
    gradient_checkpointing: bool | None = None
    peak_bytes: int | None = None  # measured, in the speed run
    tokens_per_s: float | None = None
    tokens_per_s_range: list[float] | None = None  # from the slowest and the fastest timed step
    loss_before: float | None = None  # held-out, in the learning run
    loss_after: float | None = None
    on_front: bool = False


class BudgetSpent(KeyboardInterrupt):
    """The budget's deadline came during a run: stops bench as Ctrl-C does, keeping what it measured."""


def default_candidates() -> list[str]:
    """The built-in strategies (and their aliases, e.g. qlora), every third-party plugin's, and `POPULAR_PEFT`."""
    from ..host import get_registry
    from ..host.manager import DEFAULT_PLUGINS

    registry = get_registry()
    entries = registry.entries()
    own = [e.strategy.name for p in BUILTIN_PLUGINS for e in entries if e.plugin == p]
    third = [e.strategy.name for e in entries if e.plugin not in DEFAULT_PLUGINS]
    return [*own, *third, *(n for n in POPULAR_PEFT if n in registry)]


def device_memory() -> tuple[int, str]:
    """The memory of the device runs go to here, and what it is: the GPU's, or the host's RAM."""
    from ..plan.fit import device_for_run

    if device_for_run() == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory, "the GPU's memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the host's memory"


def recommend(settings: RecommendSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Plan, measure and rank the candidates in ``settings``; the recommendation as JSON data, also written to
    ``settings.output`` (a new directory) with the bench reports and the HTML report."""
    started = time.monotonic()
    say = progress or (lambda _: None)
    budget_s = _check(settings)
    limit, limit_source = _limit(settings.spec)
    spec = dataclasses.replace(settings.spec, memory_limit=settings.spec.memory_limit or f"{limit // 2**20}MiB")
    names = settings.candidates or default_candidates()
    output = _new_directory(settings.output or _default_output(spec))
    candidates = [Candidate(n) for n in names]
    specs = {c.name: _plan(c, spec) for c in candidates}  # 1. plan; a typo in any name is an error before any run
    planned = [c for c in candidates if c.status == "planned"]
    say(f"planned {len(candidates)} candidates: {len(planned)} fit {format_bytes(limit)} ({limit_source})")
    runs = _Runs(specs, limit)
    steps, interrupted = 0, False
    with _deadline(started + budget_s) as runs.stopped:
        try:
            for c in planned:  # 2. speed
                if time.monotonic() - started > SPEED_SHARE * budget_s:
                    c.status, c.reason = "not measured", (f"the budget's share for speed runs ({SPEED_SHARE:.0%}) "
                                                          "was spent before its turn")
                    continue
                say(f"speed: {c.name}")
                runs.bench(c, "speed", {**SPEED_STEPS, "quality_steps": 0})
            measured = [c for c in planned if c.status == "planned"]
            steps = learning_steps(settings, spec, measured, runs.speed, started + budget_s - time.monotonic())
            for c in (c for c in measured if c.status == "planned"):  # 3. learning
                say(f"learning: {c.name}, {steps} steps")
                runs.bench(c, "learning", {"warmup": 0, "steps": 1, "repeats": 1, "quality_steps": steps})
        except BudgetSpent:
            pass
        except KeyboardInterrupt:
            interrupted = True
    for c in planned:
        if c.status == "planned" and not (c.name in runs.speed and c.name in runs.learning):
            c.status, c.reason = "not measured", ("interrupted before its turn" if interrupted
                                                  else "the budget ran out before its turn")
    from .ranking import Measured, rank  # 4. rank

    ok = [Measured(c.name, runs.speed[c.name][0], runs.learning[c.name][0]) for c in planned
          if c.status == "planned"]
    ranking = rank(ok) if ok else None
    result = _result(settings, spec, limit, limit_source, candidates, ranking, runs, steps,
                     time.monotonic() - started, budget_s)
    result["interrupted"] = interrupted
    from .render import write_outputs

    write_outputs(output, result, runs.reports["speed"], runs.reports["learning"])
    return result


def _plan(c: Candidate, spec: RunSpec) -> RunSpec | None:
    """``c`` resolved and fitted into the memory limit by the planner: the spec its runs take, with what the
    fit chose recorded in ``c``; None, with ``c`` excluded or refused, when it cannot run. A strategy the planner
    cannot predict runs unfitted: its measured peak is then checked against the limit instead."""
    from ..plan.fit import MemoryLimitTooSmall, Unpredictable
    from ..resolver import resolve

    mine = dataclasses.replace(spec, strategy=c.name, options=dict(spec.options))
    try:
        run = resolve(mine, data=False)
    except Unpredictable as exc:
        c.reason = f"no plan: {str(exc).split('(', 1)[-1].split(')', 1)[0]}; its measured peak is checked instead"
        return dataclasses.replace(mine, memory_limit=None)
    except StrategyRefused as exc:
        c.status, c.reason = ("excluded" if isinstance(exc, MemoryLimitTooSmall) else "refused"), str(exc)
        return None
    chosen = run.fit["chosen"]
    c.planned_peak_bytes = chosen["predicted_peak_bytes"]
    c.batch_size, c.gradient_accumulation_steps, c.gradient_checkpointing = (
        chosen["batch_size"], chosen["gradient_accumulation_steps"], chosen["gradient_checkpointing"])
    return mine


def _check(settings: RecommendSettings) -> float:
    if not settings.budget_minutes > 0 or math.isinf(settings.budget_minutes):
        raise AdaptersError(f"--budget-minutes {settings.budget_minutes}: give a positive number of minutes, e.g. 10.")
    if settings.budget_tokens is not None and settings.budget_tokens < 1:
        raise AdaptersError(f"--budget-tokens {settings.budget_tokens}: give a positive number of tokens, or leave it "
                            "out to use what the time budget allows.")
    if settings.candidates is not None and not settings.candidates:
        raise AdaptersError("--candidates is empty. Name at least one, e.g. --candidates lora,full-finetune.")
    return 60 * settings.budget_minutes


def _limit(spec: RunSpec) -> tuple[int, str]:
    if spec.memory_limit is not None:
        return parse_size(spec.memory_limit), "--memory-limit"
    return device_memory()


def _default_output(spec: RunSpec) -> str:
    return f"recommend-{spec.model.replace(':', '-').replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


def _new_directory(path: str) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdaptersError(f"--output {out}: exists and is not an empty directory; recommend never writes over "
                            "anything. Choose a new directory.")
    return out


@contextlib.contextmanager
def _deadline(at: float) -> Iterator[list[bool]]:
    """Raise `BudgetSpent` in the main thread at ``at`` (time.monotonic); the flag in the list says it came."""
    stopped = [False]
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def stop(signum, frame) -> None:
        stopped[0] = True
        raise BudgetSpent

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(at - time.monotonic(), 0.001))
    try:
        yield stopped
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Runs:
    """The bench runs of the candidates: every report (failed ones too), and each ok result with its seconds."""

    def __init__(self, specs: dict[str, RunSpec | None], limit: int) -> None:
        self.specs, self.limit = specs, limit
        self.stopped = [False]
        self.reports: dict[str, list[dict]] = {"speed": [], "learning": []}
        self.speed: dict[str, tuple[Any, float]] = {}
        self.learning: dict[str, tuple[Any, float]] = {}

    def bench(self, c: Candidate, kind: str, how: dict[str, int]) -> None:
        """One bench run of ``c`` (in a fresh process, as `adapters bench` runs it); ``c`` marked when it gave no
        result. The budget's deadline or Ctrl-C during it is raised again once bench has kept what it measured."""
        from ..bench import BenchSettings, run_bench
        from ..reports.load import as_report

        began = time.monotonic()
        report = run_bench(BenchSettings(spec=self.specs[c.name], strategies=[c.name], **how), progress=False)
        self.reports[kind].append(report)
        result = as_report(report).results[0]
        if report.get("interrupted"):
            c.status, c.reason = "not measured", ("the budget ran out during its run" if self.stopped[0]
                                                  else "interrupted during its run")
            raise BudgetSpent if self.stopped[0] else KeyboardInterrupt
        if not result.ok:
            c.status, c.reason = ("refused" if result.status == "refused" else "failed"), result.message
        elif how["quality_steps"] and (result.quality is None or result.quality.status != "ok"):
            c.status, c.reason = "failed", f"its learning run failed: {result.quality and result.quality.message}"
        elif c.planned_peak_bytes is None and result.memory.peak_bytes > self.limit:
            c.status, c.reason = "excluded", (f"the planner cannot predict it, and its measured peak, "
                                              f"{format_bytes(result.memory.peak_bytes)}, is over the memory limit "
                                              f"({format_bytes(self.limit)})")
        else:
            getattr(self, kind)[c.name] = (result, time.monotonic() - began)


def learning_steps(settings: RecommendSettings, spec: RunSpec, measured: list[Candidate],
                   speed: dict[str, tuple[Any, float]], left_s: float) -> int:
    """The learning runs' training steps, the same for every candidate: from ``budget_tokens``, or the most the time
    left allows; candidates that the time cannot fit at `MIN_LEARNING_STEPS` are marked, the slowest first."""
    if not measured:
        return 0
    if settings.budget_tokens is not None:
        per_step = speed[measured[0].name][0].tokens_per_step
        return max(1, math.ceil(settings.budget_tokens / per_step))
    costs = {}
    for c in measured:
        result, took = speed[c.name]
        step = result.step_s.median
        timed = SPEED_STEPS["warmup"] + SPEED_STEPS["steps"] * SPEED_STEPS["repeats"]
        startup = max(took - timed * step, 0.0)
        fixed = EXTRA_STARTUP * startup + (1 + 2 * spec.eval_batches * FORWARD_SHARE) * step
        costs[c.name] = (fixed, step)
    kept = list(measured)
    while kept:
        fixed = sum(costs[c.name][0] for c in kept)
        per_step = sum(costs[c.name][1] for c in kept)
        steps = math.floor((MARGIN * left_s - fixed) / per_step)
        if steps >= MIN_LEARNING_STEPS:
            return steps
        slowest = max(kept, key=lambda c: costs[c.name][1])
        slowest.status, slowest.reason = "not measured", (
            f"the budget left no time for its learning run at {MIN_LEARNING_STEPS} steps (its steps are the slowest)")
        kept.remove(slowest)
    return 0


def _result(settings: RecommendSettings, spec: RunSpec, limit: int, limit_source: str, candidates: list[Candidate],
            ranking: Any, runs: _Runs, steps: int, took: float, budget_s: float) -> dict[str, Any]:
    """The recommendation as JSON data: every candidate in ranked order, the settings and the budget."""
    if ranking is not None:
        place = {m.name: i for i, m in enumerate(ranking.order)}
        for c in candidates:
            if c.name not in place:
                continue
            s, q = runs.speed[c.name][0], runs.learning[c.name][0]
            low, high = s.step_s.min, s.step_s.max
            c.peak_bytes, c.tokens_per_s = s.memory.peak_bytes, s.tokens_per_s
            c.tokens_per_s_range = [s.tokens_per_step / high, s.tokens_per_step / low]
            c.loss_before, c.loss_after = q.quality.before["loss"], q.quality.after["loss"]
            c.on_front = c.name in ranking.front
            c.status = "recommended" if c.name == ranking.recommended else "measured"
            c.reason = ranking.why if c.name == ranking.recommended else ranking.lost[c.name]
        order = {"recommended": 0, "measured": 1, "failed": 2, "not measured": 3, "excluded": 4, "refused": 5}
        candidates = sorted(candidates, key=lambda c: (order.get(c.status, 9), place.get(c.name, 0)))
    tokens_per_step = next((r.tokens_per_step for r, _ in runs.speed.values()), None)
    from ..reports.compare import noise_rule

    return {
        "model": spec.model, "data": str(spec.data) if spec.data is not None else None,
        "task": spec.task, "batch_size": spec.batch_size, "seq_len": spec.seq_len,
        "memory_limit_bytes": limit, "memory_limit_source": limit_source,
        "budget_minutes": settings.budget_minutes, "seconds": round(took, 1),
        "within_budget": took <= budget_s,
        "learning_steps": steps, "learning_tokens": steps * tokens_per_step if tokens_per_step else None,
        "recommended": ranking.recommended if ranking else None,
        "within_noise": ranking.within_noise if ranking else [],
        "why": ranking.why if ranking else "no candidate was measured: see each one's reason.",
        "front": ranking.front if ranking else [],
        "noise_rule": noise_rule(),
        "candidates": [dataclasses.asdict(c) for c in candidates],
    }
