"""Run a benchmark suite: every strategy in a fresh process, the plan beside each, into one report."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from .. import rules
from ..errors import AdaptersError
from ..files import write_json
from ..reports.model import (
    SCHEMA_VERSION,
    Cancelled,
    Capacity,
    OkResult,
    Prediction,
    Provenance,
    Refused,
    Report,
    Result,
    Scaling,
    Settings,
)
from ..runspec import RunSpec
from .capacity import find_capacity, search_limit
from .predict import predict
from .provenance import device_kind, provenance
from .settings import BenchSettings, Measurement
from .worker import null_non_finite, run_case


@dataclasses.dataclass
class _Outcome:
    """What the suite's cases gave: every result in order, the runs measured, the capacity searches."""

    results: list[Result] = dataclasses.field(default_factory=list)
    measured: list[tuple[RunSpec, Result]] = dataclasses.field(default_factory=list)  # the run, its result
    capacity: list[Capacity] = dataclasses.field(default_factory=list)
    interrupted: str | None = None  # the signal that stopped the suite


def run_bench(settings: BenchSettings, progress: bool = True, *, overwrite: bool = False) -> dict[str, Any]:
    """Benchmark every strategy in ``settings`` and return the report as written to ``output`` (JSON data of the
    typed `adapters.reports.Report`, which `adapters.reports.as_report` gives back).

    With ``find_max`` set, each strategy's largest batch size or sequence length is searched by real
    runs instead, and the report's result for it is the run at that value.

    An existing ``output`` is refused before any work, unless ``overwrite`` and it is a report
    (`adapters.reports.check_output`). Ctrl-C (SIGINT) or SIGTERM, at any point of the suite or of
    the predictions after it, stops it: the report keeps what was measured, records the other
    strategies as cancelled, is written all the same, and says ``"interrupted": true``.
    """
    from ..reports.output import check_output, is_bench_report

    output = Path(settings.output) if settings.output else None
    if output is not None:
        check_output(output, overwrite, is_bench_report, "a report written by `adapters bench`")
    outcome = _Outcome()
    try:
        with _signals_interrupt(outcome):
            refusals = _refusals(settings)
            _run_cases(settings, refusals, search_limit(settings), progress, outcome)
            shapes: dict[str, Any] = {}
            for spec, result in outcome.measured:
                if result.ok:
                    result.prediction = predict(spec, result, shapes)
    except KeyboardInterrupt:  # keep what was measured; mark the rest
        outcome.interrupted = outcome.interrupted or "SIGINT"
    with _signals_deferred():  # a second Ctrl-C must not cost the report
        if outcome.interrupted:
            _cancel_the_rest(settings, outcome)
        if output is not None:
            output = _free_output(output, overwrite)
            settings = dataclasses.replace(settings, output=str(output))
        report = null_non_finite(msgspec.to_builtins(_report(settings, outcome)))  # strict JSON, whatever slipped
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            write_json(output, report)
    return report


@contextlib.contextmanager
def _signals_interrupt(outcome: _Outcome) -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the block (SIGTERM too: a CI timeout keeps the report)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def stop(signum, frame) -> None:
        outcome.interrupted = signal.Signals(signum).name
        raise KeyboardInterrupt

    for s in previous:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Within the block (writing the report: a moment), SIGINT and SIGTERM are noted, not obeyed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def wait(signum, frame) -> None:
        print(f"\n{signal.Signals(signum).name}: writing the report with what was measured; a moment.",
              file=sys.stderr, flush=True)

    for s in previous:
        signal.signal(s, wait)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _cancel_the_rest(settings: BenchSettings, outcome: _Outcome) -> None:
    """Strategies without a result are cancelled; measured ones keep their result, without a prediction
    when the interrupt came before it."""
    done = {r.strategy for r in outcome.results}
    outcome.results.extend(Cancelled(strategy=name, message=f"interrupted ({outcome.interrupted}) before it ran to "
                                     "the end") for name in settings.strategies if name not in done)
    for result in outcome.results:
        if result.ok and result.prediction is None:
            result.prediction = Prediction(status="cancelled", message="interrupted before the plan's prediction")


def _free_output(output: Path, overwrite: bool) -> Path:
    """``output``, or where the report goes when something took its place during the run: the
    measurements are never lost for a name."""
    from ..reports.output import check_output, is_bench_report

    try:
        check_output(output, overwrite, is_bench_report, "a report written by `adapters bench`")
        return output
    except AdaptersError as exc:
        n = 1
        while (moved := output.with_name(f"{output.stem}.{n}{output.suffix}")).exists():
            n += 1
        print(f"Note: {exc} Writing the report to {moved} instead.", file=sys.stderr, flush=True)
        return moved


def _refusals(settings: BenchSettings) -> dict[str, str]:
    """Every case resolved before any work starts: a typo is an error; what a strategy declares it
    cannot do (full-finetune on a quantized base) is its message, recorded as a refused row."""
    from ..resolver import resolve
    from ..runspec import StrategyRefused

    if not settings.strategies:
        raise AdaptersError("--strategies is empty. Name at least one, e.g. --strategies lora,full-finetune.")
    refusals = {}
    for name in settings.strategies:
        try:
            resolve(settings.case(name), data=False)
        except StrategyRefused as exc:
            refusals[name] = str(exc)
    return refusals


def _run_cases(settings: BenchSettings, refusals: dict[str, str], limit: int | None, progress: bool,
               outcome: _Outcome) -> None:
    """Each strategy measured (or its capacity searched) in its own process, in order, into ``outcome``."""
    from tqdm.auto import tqdm

    measurement = settings.measurement()
    bar = tqdm(settings.strategies, desc="bench", unit="strategy", disable=not progress)
    try:
        for name in bar:
            bar.set_postfix(strategy=name)
            if name in refusals:
                outcome.results.append(Refused(strategy=name, message=refusals[name]))
                continue
            spec = settings.case(name)
            if settings.find_max:
                result, search = find_capacity(settings, name, limit, bar)
                outcome.capacity.append(search)
                if search.largest is not None:  # predicted for the shape it ran: the largest found
                    spec = dataclasses.replace(spec, **{settings.find_max: search.largest})
            else:
                result = _measure(settings, spec, measurement)
            outcome.results.append(result)
            outcome.measured.append((spec, result))
    finally:
        bar.close()


def _measure(settings: BenchSettings, spec: RunSpec, measurement: Measurement) -> Result:
    """One strategy measured in a fresh process, or in a torchrun of ``settings.processes``; with several, also in a
    torchrun of one, for the scaling efficiency: tokens/s with N processes / (N x tokens/s with 1)."""
    n = settings.processes
    if n == 1 and settings.spec.sharding == "none":
        return run_case(spec, measurement)
    result = run_case(spec, measurement, n)
    if n > 1 and isinstance(result, OkResult):
        single = run_case(spec, measurement, 1)
        if isinstance(single, OkResult):
            result.scaling = Scaling(single_process_tokens_per_s=single.tokens_per_s,
                                     single_process_peak_bytes=single.memory.peak_bytes,
                                     efficiency=result.tokens_per_s / (n * single.tokens_per_s))
        else:
            result.flags.append(f"no scaling efficiency: the run of 1 process {single.status}: {single.message}")
    return result


def _report(settings: BenchSettings, outcome: _Outcome) -> Report:
    """The report as written: provenance, the settings with what they imply, results, capacity searches."""
    device, s = device_kind(), settings.spec
    return Report(
        schema_version=SCHEMA_VERSION,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        provenance=msgspec.convert({**provenance(), "seed": s.seed}, Provenance),
        settings=Settings(**settings.to_dict(), dtype=rules.base_dtype(device, s.master_weights, s.mixed_precision),
                          device=device,
                          effective_batch_size=s.batch_size * s.gradient_accumulation_steps * settings.processes),
        results=outcome.results, capacity=outcome.capacity, interrupted=bool(outcome.interrupted))
