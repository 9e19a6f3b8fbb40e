"""`adapters recommend` as a library call: plan every candidate, measure those that fit, rank them.

The pipeline, each step one that `plan`, `bench` and `compare` already have; recommend adds no way to measure:

1. **Plan.** Every candidate is resolved and fitted into the memory limit (`--memory-limit`, else the device's
   memory) by the planner, as `adapters train --memory-limit` fits a run (`adapters.plan.fit`). One that does not
   fit is *excluded*, with the planner's reason, and never run; one whose strategy cannot do the run (a
   quantization, the task) is *refused*. One the planner cannot predict is run, and its measured peak checked.
2. **Measure.** Each candidate that fits is benchmarked by `adapters bench`, in a fresh process: a warm-up step and
   two timed ones (tokens/s with its step-time range, the measured peak), then held-out loss before and after
   the same N training steps on the user's data (``--quality-steps N``): `DEFAULT_LEARNING_STEPS`, or
   ``budget_tokens`` worth. The same N for every candidate, whatever the time left: the losses compare, and two
   calls measure the same thing.
3. **Rank** (`adapters.recommend.ranking`): compare's noise rules, the Pareto front, the recommendation and why
   every other candidate lost.

The budget is a deadline, less a few seconds kept for writing (`reserve`). A candidate is not started when the
longest run so far would not end before it; a run still going at it is stopped (as Ctrl-C stops bench, keeping
what was measured). Either way the candidate says so. Everything is kept in the output directory: the bench
report (``bench.json``: `adapters compare` and `adapters report` read it), ``recommend.json`` and ``report.html``.
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
# Each candidate's bench run: a warm-up step, then two repeats of one timed step, whose two times give the range
# that compare's noise rule reads; then the learning run.
TIMED = {"warmup": 1, "steps": 1, "repeats": 2}
# The learning run's steps by default: enough for the held-out loss of a short run to tell strategies apart at a
# learning rate of their own (on the chat file of docs/recommend.md they differ by 5 to 15% after 16 steps).
DEFAULT_LEARNING_STEPS = 16


@dataclass
class RecommendSettings:
    """What `adapters recommend` accepts: the run every candidate is measured on (`spec`, as bench's) and how."""

    spec: RunSpec = field(default_factory=RunSpec)
    candidates: list[str] | None = None  # None: `default_candidates`
    budget_minutes: float = 10.0
    budget_tokens: int | None = None  # the learning run's tokens; None: DEFAULT_LEARNING_STEPS' worth
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
    checkpoint_layers: int | None = None  # with gradient_checkpointing: the first this many layers; None: all
    offload_activations: bool | None = None
    peak_bytes: int | None = None  # measured
    tokens_per_s: float | None = None
    tokens_per_s_range: list[float] | None = None  # from the slowest and the fastest timed step
    loss_before: float | None = None  # held-out, in the learning run
    loss_after: float | None = None
    on_front: bool = False


class BudgetSpent(KeyboardInterrupt):
    """The budget's deadline came during a run: stops bench as Ctrl-C does, keeping what it measured."""


def default_candidates() -> list[str]:
    """The built-in strategies, then their aliases (qlora), every third-party plugin's strategies, `POPULAR_PEFT`."""
    from ..host import get_registry
    from ..host.manager import DEFAULT_PLUGINS

    registry = get_registry()
    entries = registry.entries()
    own = [e.strategy.name for p in BUILTIN_PLUGINS for e in entries if e.plugin == p and e.alias_of is None]
    own += [e.strategy.name for p in BUILTIN_PLUGINS for e in entries if e.plugin == p and e.alias_of is not None]
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
    steps = learning_steps(settings)
    say(f"planned {len(candidates)} candidates: {len(planned)} fit {format_bytes(limit)} ({limit_source}); "
        f"each is measured with {steps} learning steps")
    runs = _Runs(specs, limit)
    interrupted = False
    deadline = started + budget_s - reserve(budget_s)  # the reports are written after it
    with _deadline(deadline) as runs.stopped:
        try:
            for c in planned:  # 2. measure
                longest = max(runs.seconds, default=0.0)
                if time.monotonic() + longest > deadline:
                    c.status, c.reason = "not measured", (f"the budget would run out during its run (the longest "
                                                          f"so far took {longest:.0f} s)")
                    continue
                say(f"measuring {c.name}")
                runs.bench(c, {**TIMED, "quality_steps": steps})
        except BudgetSpent:
            pass
        except KeyboardInterrupt:
            interrupted = True
    for c in planned:
        if c.status == "planned" and c.name not in runs.results:
            c.status, c.reason = "not measured", ("interrupted before its turn" if interrupted
                                                  else "the budget ran out before its turn")
    from .ranking import Measured, rank  # 3. rank

    ok = [Measured(c.name, runs.results[c.name], runs.results[c.name]) for c in planned if c.status == "planned"]
    ranking = rank(ok) if ok else None
    result = _result(settings, spec, limit, limit_source, candidates, ranking, runs, steps)
    result["interrupted"] = interrupted
    from .render import write_outputs

    def took() -> None:
        result["seconds"] = round(time.monotonic() - started, 1)
        result["within_budget"] = result["seconds"] <= budget_s

    write_outputs(output, result, runs.reports, took)
    return result


def reserve(budget_s: float) -> float:
    """The seconds kept at the end of the budget for ranking and writing the reports (the charts take a few)."""
    return max(8.0, 0.03 * budget_s)


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
    c.batch_size, c.gradient_accumulation_steps, c.gradient_checkpointing, c.offload_activations = (
        chosen["batch_size"], chosen["gradient_accumulation_steps"], chosen["gradient_checkpointing"],
        chosen["offload_activations"])
    c.checkpoint_layers = chosen["checkpoint_layers"]
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
    """The bench runs of the candidates: every report (failed ones too), each ok result, and the seconds each took."""

    def __init__(self, specs: dict[str, RunSpec | None], limit: int) -> None:
        self.specs, self.limit = specs, limit
        self.stopped = [False]
        self.reports: list[dict] = []
        self.results: dict[str, Any] = {}
        self.seconds: list[float] = []

    def bench(self, c: Candidate, how: dict[str, int]) -> None:
        """One bench run of ``c`` (in a fresh process, as `adapters bench` runs it); ``c`` marked when it gave no
        result. The budget's deadline or Ctrl-C during it is raised again once bench has kept what it measured."""
        from ..bench import BenchSettings, run_bench
        from ..reports.load import as_report

        began = time.monotonic()
        report = run_bench(BenchSettings(spec=self.specs[c.name], strategies=[c.name], **how), progress=False)
        self.reports.append(report)
        self.seconds.append(time.monotonic() - began)
        result = as_report(report).results[0]
        if report.get("interrupted"):
            c.status, c.reason = "not measured", ("the budget ran out during its run" if self.stopped[0]
                                                  else "interrupted during its run")
            raise BudgetSpent if self.stopped[0] else KeyboardInterrupt
        if not result.ok:
            c.status, c.reason = ("refused" if result.status == "refused" else "failed"), result.message
        elif result.quality is None or result.quality.status != "ok":
            c.status, c.reason = "failed", f"its learning run failed: {result.quality and result.quality.message}"
        elif (result.quality.after or {}).get("loss") is None:
            c.status, c.reason = "failed", "its held-out loss after the learning run is not finite"
        elif c.planned_peak_bytes is None and result.memory.peak_bytes > self.limit:
            c.status, c.reason = "excluded", (f"the planner cannot predict it, and its measured peak, "
                                              f"{format_bytes(result.memory.peak_bytes)}, is over the memory limit "
                                              f"({format_bytes(self.limit)})")
        else:
            self.results[c.name] = result


def learning_steps(settings: RecommendSettings) -> int:
    """The learning run's training steps, the same for every candidate: ``budget_tokens`` worth (a step trains
    batch x accumulation x seq_len tokens, packed rows being full), else `DEFAULT_LEARNING_STEPS`."""
    if settings.budget_tokens is None:
        return DEFAULT_LEARNING_STEPS
    s = settings.spec
    return max(1, math.ceil(settings.budget_tokens / (s.batch_size * s.gradient_accumulation_steps * s.seq_len)))


def _result(settings: RecommendSettings, spec: RunSpec, limit: int, limit_source: str, candidates: list[Candidate],
            ranking: Any, runs: _Runs, steps: int) -> dict[str, Any]:
    """The recommendation as JSON data: every candidate in ranked order, the settings and the budget."""
    if ranking is not None:
        place = {m.name: i for i, m in enumerate(ranking.order)}
        for c in candidates:
            if c.name not in place:
                continue
            s = q = runs.results[c.name]
            low, high = s.step_s.min, s.step_s.max
            c.peak_bytes, c.tokens_per_s = s.memory.peak_bytes, s.tokens_per_s
            c.tokens_per_s_range = [s.tokens_per_step / high, s.tokens_per_step / low]
            c.loss_before, c.loss_after = q.quality.before["loss"], q.quality.after["loss"]
            c.on_front = c.name in ranking.front
            c.status = "recommended" if c.name == ranking.recommended else "measured"
            c.reason = ranking.why if c.name == ranking.recommended else ranking.lost[c.name]
        order = {"recommended": 0, "measured": 1, "failed": 2, "not measured": 3, "excluded": 4, "refused": 5}
        candidates = sorted(candidates, key=lambda c: (order.get(c.status, 9), place.get(c.name, 0)))
    tokens_per_step = next((r.tokens_per_step for r in runs.results.values()), None)
    from ..reports.compare import noise_rule

    return {
        "model": spec.model, "data": str(spec.data) if spec.data is not None else None,
        "task": spec.task, "batch_size": spec.batch_size, "seq_len": spec.seq_len,
        "memory_limit_bytes": limit, "memory_limit_source": limit_source,
        "budget_minutes": settings.budget_minutes, "seconds": None, "within_budget": None,  # set when written
        "learning_steps": steps, "learning_tokens": steps * tokens_per_step if tokens_per_step else None,
        "recommended": ranking.recommended if ranking else None,
        "within_noise": ranking.within_noise if ranking else [],
        "why": ranking.why if ranking else "no candidate was measured: see each one's reason.",
        "front": ranking.front if ranking else [],
        "noise_rule": noise_rule(),
        "candidates": [dataclasses.asdict(c) for c in candidates],
    }
