"""Run a benchmark suite: every strategy in a fresh process, the plan beside each, into one report."""
from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path
from typing import Any

from ..errors import AdaptersError
from ..files import write_json
from ..runspec import RunSpec
from .capacity import find_capacity, search_limit
from .predict import predict
from .provenance import device_kind, provenance
from .settings import BenchSettings
from .worker import run_case


@dataclasses.dataclass
class _Outcome:
    """What the suite's cases gave: every result in order, the runs measured, the capacity searches."""

    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    measured: list[tuple[RunSpec, dict[str, Any]]] = dataclasses.field(default_factory=list)  # the run, its result
    capacity: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def run_bench(settings: BenchSettings, progress: bool = True) -> dict[str, Any]:
    """Benchmark every strategy in ``settings`` and return the report (also written to ``output``).

    With ``find_max`` set, each strategy's largest batch size or sequence length is searched by real
    runs instead, and the report's result for it is the run at that value. Ctrl-C keeps what was
    measured and records the other strategies as cancelled.
    """
    refusals = _refusals(settings)
    output = Path(settings.output) if settings.output else None
    if output is not None and output.exists():
        raise AdaptersError(f"--output {output}: exists. Choose a new file name; reports are never overwritten.")
    outcome = _run_cases(settings, refusals, search_limit(settings), progress)
    shapes: dict[str, Any] = {}
    for spec, result in outcome.measured:
        if result["status"] == "ok":
            result["prediction"] = predict(spec, result, shapes)
    report = _report(settings, outcome)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_json(output, report)
    return report


def _refusals(settings: BenchSettings) -> dict[str, str]:
    """Every case resolved before any work starts: a typo is an error; what a strategy declares it
    cannot do (full-finetune on a quantized base) is its message, recorded as a refused row."""
    from ..runspec import StrategyRefused, resolve

    if not settings.strategies:
        raise AdaptersError("--strategies is empty. Name at least one, e.g. --strategies lora,full-finetune.")
    refusals = {}
    for name in settings.strategies:
        try:
            resolve(settings.spec(name), data=False)
        except StrategyRefused as exc:
            refusals[name] = str(exc)
    return refusals


def _run_cases(settings: BenchSettings, refusals: dict[str, str], limit: int | None, progress: bool) -> _Outcome:
    """Each strategy measured (or its capacity searched) in its own process, in order."""
    from tqdm.auto import tqdm

    outcome = _Outcome()
    measurement = settings.measurement()
    bar = tqdm(settings.strategies, desc="bench", unit="strategy", disable=not progress)
    try:
        for name in bar:
            bar.set_postfix(strategy=name)
            if name in refusals:
                outcome.results.append({"strategy": name, "status": "refused", "message": refusals[name]})
                continue
            spec = settings.spec(name)
            if settings.find_max:
                result, search = find_capacity(settings, name, limit, bar)
                outcome.capacity.append(search)
                if search["largest"] is not None:  # predicted for the shape it ran: the largest found
                    spec = dataclasses.replace(spec, **{settings.find_max: search["largest"]})
            else:
                result = run_case(spec, measurement)
            outcome.results.append(result)
            outcome.measured.append((spec, result))
    except KeyboardInterrupt:  # keep what was measured; mark the rest
        done = {r["strategy"] for r in outcome.results}
        outcome.results.extend({"strategy": name, "status": "cancelled", "message": "interrupted by the user"}
                               for name in settings.strategies if name not in done)
    finally:
        bar.close()
    return outcome


def _report(settings: BenchSettings, outcome: _Outcome) -> dict[str, Any]:
    """The report as written: provenance, the settings with what they imply, results, capacity searches."""
    from ..reports import SCHEMA_VERSION

    device = device_kind()
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": {**provenance(), "seed": settings.seed},
        "settings": {**settings.to_dict(), "gradient_accumulation_steps": 1,
                     "effective_batch_size": settings.batch_size,
                     "dtype": "bfloat16" if device == "cuda" else "float32", "device": device},
        "results": outcome.results,
    }
    if settings.find_max:
        report["capacity"] = outcome.capacity
    return report
