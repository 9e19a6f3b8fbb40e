"""Compare benchmark reports: two runs of the same suite, or strategies within one run.

``compare_reports(base, new)`` matches results by their ``strategy`` spec (e.g. ``"lora@nf4"``),
compares every metric in `adapters.reports.METRICS` for the strategies that are ``ok`` in both, and
calls each change ``better``, ``worse`` or ``noise``. It returns data; `adapters.reports.commands`
turns it into text.

The noise rule. Every row gets a *noise band*, an interval of new/base ratios that count as noise:

* Timed metrics (``Metric.timed``: tokens/s, step time, MFU, energy/token) are derived from step
  times, so each run's spread of step times bounds them: a run whose median step took ``m`` and
  whose steps took ``min``..``max`` could have measured the metric anywhere between its values at
  ``min`` and at ``max`` (``value * min/m`` .. ``value * max/m`` for step time and energy,
  ``value * m/max`` .. ``value * m/min`` for tokens/s and MFU). The change is noise when the two
  runs' ranges overlap, i.e. when some step of one run was as fast as some step of the other. The
  band never narrows below ±2% (`TIMED_FLOOR`): run-to-run drift (clocks, thermals, other load)
  that a single report's spread cannot show.
* Load time is judged the same way from the runs' own loads: a report records every load's seconds
  (``load_s_repeats``: the first, ``load_s``, in a fresh process, then once more per further repeat
  in the same one), so the change is noise when the two runs' ranges of load times overlap. The
  band never narrows below ±10% (`LOAD_FLOOR`: file cache and disk drift between runs). A report
  that recorded no spread (an older one, or one repeat: a single load) is judged conservatively:
  noise within a factor of 1.5 either way (`LOAD_WITHOUT_SPREAD`).
* Other untimed metrics use a fixed relative tolerance (`TOLERANCE`): 1% for peak memory
  (allocations are nearly deterministic), 1% for held-out loss and accuracy.

Settings. Besides the reports' settings, each result may record the micro-batch and accumulation
it really ran with (a run that backed off after running out of memory); where those differ between
the reports for a strategy, a warning says so.

``--reference`` (`relative_to`) states every strategy of one report against a reference strategy,
hyperfine-style. Its ± propagates both runs' uncertainties as relative errors added in quadrature
(as hyperfine does with standard deviations), taking a run's uncertainty as half its spread, the
``±`` that ``adapters bench`` prints: ``± = ratio * sqrt((spread_a/2)**2 + (spread_b/2)**2)``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import AdaptersError
from .load import as_report
from .metrics import METRICS, Metric
from .model import OkResult, Report

TIMED_FLOOR = 0.02
LOAD_FLOOR = 0.10
LOAD_WITHOUT_SPREAD = 1.5  # a factor either way, for a report without the spread of its load times
TOLERANCE = {"peak_memory": 0.01, "heldout_loss": 0.01, "accuracy": 0.01}
DEFAULT_TOLERANCE = 0.01  # an untimed metric added to METRICS without its own tolerance
# Timed metrics that grow as steps get faster (value ∝ 1/step time); the others grow with step time.
_INVERSE_TO_STEP_TIME = {"tokens_per_s", "mfu"}

MARKS = {"better": "+", "worse": "!", "noise": "~", "n/a": "?"}
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
COMPARED_SETTINGS = ("model", "device", "dtype", "batch_size", "gradient_accumulation_steps", "effective_batch_size",
                     "seq_len", "gradient_checkpointing", "checkpoint_layers", "quality_steps", "processes", "sharding")

ReportLike = Report | Mapping[str, Any]


@dataclass
class Row:
    """One metric of one strategy in both reports."""

    strategy: str
    metric: str
    label: str
    direction: str  # "higher is better" or "lower is better"
    base: float | None
    new: float | None
    ratio: float | None  # new / base; None when either is missing or base is 0
    noise_band: list[float] | None  # [low, high]: ratios in it are noise
    verdict: str  # "better", "worse", "noise", or "n/a" when a report lacks the metric

    @property
    def mark(self) -> str:
        return MARKS[self.verdict]


@dataclass
class Failure:
    """A --fail-on threshold exceeded (or a strategy that stopped working)."""

    spec: str
    strategy: str
    metric: str | None
    change_pct: float | None  # how much worse, in percent of base
    message: str


@dataclass
class Comparison:
    """What `compare_reports` found."""

    rows: list[Row]
    warnings: list[str]
    only_in_base: list[str]
    only_in_new: list[str]
    not_compared: list[dict[str, Any]]  # in both reports, but not ok in at least one: {strategy, base, new}
    base_info: dict[str, Any] = field(default_factory=dict)
    new_info: dict[str, Any] = field(default_factory=dict)

    @property
    def strategies(self) -> list[str]:
        return list(dict.fromkeys(r.strategy for r in self.rows))

    def row(self, strategy: str, metric: str) -> Row:
        for r in self.rows:
            if r.strategy == strategy and r.metric == metric:
                return r
        raise KeyError((strategy, metric))

    def failures(self, thresholds: list[tuple[Metric, float]]) -> list[Failure]:
        """Rows worse than their threshold and beyond noise; with any threshold, also strategies that
        were ok in base but are not in new (a run that now fails or runs out of memory)."""
        found = []
        for metric, pct in thresholds:
            spec = f"{metric.name}:{pct:g}%"
            for r in self.rows:
                if r.metric != metric.name or r.verdict != "worse":
                    continue
                change = _worse_pct(r, metric)
                if change is None or change > pct:
                    shown = "from 0" if change is None else f"{change:.1f}% worse"
                    found.append(Failure(spec, r.strategy, r.metric, change,
                                         f"{r.strategy}: {r.label} {shown} ({metric.format(r.base)} -> "
                                         f"{metric.format(r.new)}), beyond --fail-on {spec}"))
        if thresholds:
            for item in self.not_compared:
                if item["base"] == "ok":
                    found.append(Failure("any", item["strategy"], None, None,
                                         f"{item['strategy']}: ok in base but {item['new']} in new"))
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base_info, "new": self.new_info, "warnings": self.warnings,
            "rows": [{**asdict(r), "mark": r.mark} for r in self.rows],
            "only_in_base": self.only_in_base, "only_in_new": self.only_in_new, "not_compared": self.not_compared,
        }


def _worse_pct(row: Row, metric: Metric) -> float | None:
    if row.ratio is None:
        return None
    return 100 * ((1 - row.ratio) if metric.higher_is_better else (row.ratio - 1))


def _relative_range(metric: Metric, result: OkResult) -> tuple[float, float]:
    """The metric's possible values within the run's step-time range, relative to its reported value."""
    step = result.step_s
    low, high = step.min / step.median, step.max / step.median
    return (1 / high, 1 / low) if metric.name in _INVERSE_TO_STEP_TIME else (low, high)


def _load_range(result: OkResult) -> tuple[float, float] | None:
    """The run's load times relative to its reported one, or None when it recorded no spread."""
    loads = result.load_s_repeats
    if not loads or len(loads) < 2 or result.load_s <= 0:
        return None
    loads = [*loads, result.load_s]
    return min(loads) / result.load_s, max(loads) / result.load_s


def _overlap(base: tuple[float, float], new: tuple[float, float], floor: float) -> tuple[float, float]:
    """The new/base ratios at which the runs' relative ranges overlap, never narrower than ±``floor``."""
    # base range [b*base_low, b*base_high] and new range [n*new_low, n*new_high] overlap
    # exactly when base_low/new_high <= n/b <= base_high/new_low.
    (base_low, base_high), (new_low, new_high) = base, new
    return min(base_low / new_high, 1 - floor), max(base_high / new_low, 1 + floor)


def noise_band(metric: Metric, base_result: OkResult, new_result: OkResult) -> tuple[float, float]:
    """The new/base ratios of ``metric`` that count as noise (see the module docstring)."""
    if metric.name == "load_time":
        base, new = _load_range(base_result), _load_range(new_result)
        if base is None or new is None:
            return 1 / LOAD_WITHOUT_SPREAD, LOAD_WITHOUT_SPREAD
        return _overlap(base, new, LOAD_FLOOR)
    if not metric.timed:
        tol = TOLERANCE.get(metric.name, DEFAULT_TOLERANCE)
        return 1 - tol, 1 + tol
    return _overlap(_relative_range(metric, base_result), _relative_range(metric, new_result), TIMED_FLOOR)


def noise_rule() -> str:
    """The noise rule in one line, as `adapters compare` and the HTML report print it."""
    return (f"noise: timed metrics and load time when the runs' ranges overlap (at least ±{TIMED_FLOOR:.0%} and "
            f"±{LOAD_FLOOR:.0%}; load time without its spread recorded: within ×{LOAD_WITHOUT_SPREAD:g}); "
            + ", ".join(f"{METRICS[k].label} ±{v:.0%}" for k, v in TOLERANCE.items()))


def _ran_with(report: Report, run: OkResult | Any) -> dict[str, int]:
    """The micro-batch and accumulation a result (or its quality run) really ran with: its own record,
    else the settings."""
    s = report.settings
    return {"batch_size": getattr(run, "batch_size", None) or s.batch_size,
            "gradient_accumulation_steps": getattr(run, "gradient_accumulation_steps", None)
            or s.gradient_accumulation_steps}


def _backoff_warnings(base: Report, new: Report, common: list[str]) -> list[str]:
    """A warning per strategy (and per quality run) that ran with other settings than its report asked
    for, where that makes the two runs differ (e.g. one halved its micro-batch after running out of memory)."""
    base_ok, new_ok = _ok_results(base), _ok_results(new)
    asked = [{k: getattr(r.settings, k) for k in ("batch_size", "gradient_accumulation_steps")} for r in (base, new)]
    out = []
    for name in common:
        for what, b, n in ((name, base_ok[name], new_ok[name]),
                           (f"{name}'s quality run", base_ok[name].quality, new_ok[name].quality)):
            ran = _ran_with(base, b), _ran_with(new, n)
            if ran[0] != ran[1] and (ran[0] != asked[0] or ran[1] != asked[1]):
                out.append(f"different settings for {what}: " + ", ".join(_changes(ran[0], ran[1], tuple(ran[0])))
                           + " (it ran with other settings than its report asked for: a back-off)")
    return out


def _verdict(metric: Metric, base: float, new: float, band: tuple[float, float]) -> tuple[float | None, str]:
    if base == 0:
        if new == 0:
            return None, "noise"
        return None, "better" if (new > 0) == metric.higher_is_better else "worse"
    ratio = new / base
    if band[0] <= ratio <= band[1]:
        return ratio, "noise"
    return ratio, "better" if (new > base) == metric.higher_is_better else "worse"


def _ok_results(report: Report) -> dict[str, OkResult]:
    return {r.strategy: r for r in report.ok_results()}


def _gpu_text(report: Report) -> str:
    gpu = report.provenance.gpu
    return "no GPU" if gpu is None else f"{gpu.name} ×{gpu.count}"


def _shown(value: Any) -> str:
    return "(absent)" if value is None else str(value)


def _changes(base: Any, new: Any, keys: tuple[str, ...]) -> list[str]:
    """``key old -> new`` for each of ``keys`` that differs (dicts by key, structs by attribute)."""
    read = (lambda obj, k: obj.get(k)) if isinstance(base, dict) else (lambda obj, k: getattr(obj, k, None))
    return [f"{k} {_shown(read(base, k))} -> {_shown(read(new, k))}" for k in keys if read(base, k) != read(new, k)]


def _warnings(base: Report, new: Report) -> list[str]:
    out = []
    bp, np_ = base.provenance, new.provenance
    gpus = [None if p.gpu is None else (p.gpu.name, p.gpu.count) for p in (bp, np_)]
    if gpus[0] != gpus[1]:
        out.append(f"different GPU: {_gpu_text(base)} -> {_gpu_text(new)}")
    elif bp.gpu is None and bp.cpu != np_.cpu:
        out.append(f"different CPU: {bp.cpu.model} ({bp.cpu.cores} cores) -> {np_.cpu.model} ({np_.cpu.cores} cores)")
    changed = _changes(bp.versions, np_.versions, VERSIONED_PACKAGES)
    if changed:
        out.append("different package versions: " + ", ".join(changed))
    changed = _changes(base.settings, new.settings, COMPARED_SETTINGS)
    if changed:
        out.append("different settings: " + ", ".join(changed))
    for name, report in (("base", base), ("new", new)):
        if report.interrupted:
            out.append(f"{name} report was interrupted: only what it measured before is there")
    for name, prov in (("base", bp), ("new", np_)):
        if prov.dirty:
            commit = (prov.commit or "unknown")[:12]
            out.append(f"{name} report ran on a dirty checkout (commit {commit} plus uncommitted changes)")
    return out


def _info(report: Report) -> dict[str, Any]:
    prov, settings = report.provenance, report.settings
    return {"created": report.created, "commit": prov.commit, "dirty": prov.dirty,
            "model": settings.model, "device": settings.device, "gpu": _gpu_text(report)}


def _rows(strategy: str, base: OkResult, new: OkResult) -> list[Row]:
    rows = []
    for metric in METRICS.values():
        bv, nv = metric.get(base), metric.get(new)
        if bv is None and nv is None:
            continue
        if bv is None or nv is None:
            rows.append(Row(strategy, metric.name, metric.label, metric.direction, bv, nv, None, None, "n/a"))
            continue
        band = noise_band(metric, base, new)
        ratio, verdict = _verdict(metric, bv, nv, band)
        rows.append(Row(strategy, metric.name, metric.label, metric.direction, bv, nv, ratio, [band[0], band[1]],
                        verdict))
    return rows


def compare_reports(base: ReportLike, new: ReportLike, *, allow_different_processes: bool = False,
                    names: tuple[str, str] = ("base report", "new report")) -> Comparison:
    """Every metric of every strategy that is ok in both reports, with a verdict; see the module docstring.

    Reports of different process counts (``settings.processes``) are refused unless ``allow_different_processes``:
    their tokens/s count other numbers of processes, and their peaks one process of differently split runs.
    ``names`` name the reports in that error (their files, from `adapters compare`)."""
    base, new = as_report(base, "base report"), as_report(new, "new report")
    if base.settings.processes != new.settings.processes and not allow_different_processes:
        raise AdaptersError(
            f"{names[0]} ran {base.settings.processes} process(es) per case and {names[1]} "
            f"{new.settings.processes}: their tokens/s and per-process peaks are not like for like. Compare reports "
            "of the same --processes, or pass --allow-different-processes to compare them anyway.")
    base_ok, new_ok = _ok_results(base), _ok_results(new)
    base_all = {r.strategy: r.status for r in base.results}
    new_all = {r.strategy: r.status for r in new.results}
    common = [s for s in base_ok if s in new_ok]
    if not common:
        raise AdaptersError(
            "the reports have no strategy that ran ok in both "
            f"(base ok: {', '.join(base_ok) or 'none'}; new ok: {', '.join(new_ok) or 'none'}). "
            "Compare reports of the same suite."
        )
    rows = [row for s in common for row in _rows(s, base_ok[s], new_ok[s])]
    not_compared = [{"strategy": s, "base": base_all[s], "new": new_all[s]}
                    for s in base_all if s in new_all and s not in common]
    return Comparison(
        rows=rows, warnings=_warnings(base, new) + _backoff_warnings(base, new, common),
        only_in_base=[s for s in base_all if s not in new_all], only_in_new=[s for s in new_all if s not in base_all],
        not_compared=not_compared, base_info=_info(base), new_info=_info(new),
    )


_FAIL_ON = re.compile(r"^\s*([A-Za-z_]+)\s*:\s*([0-9]*\.?[0-9]+)\s*%?\s*$")


def parse_fail_on(specs: list[str] | tuple[str, ...]) -> list[tuple[Metric, float]]:
    """``["tokens_per_s:5%", "peak_memory:2"]`` as (metric, percent) pairs."""
    out = []
    for spec in specs:
        match = _FAIL_ON.match(spec)
        metric = METRICS.get(match.group(1)) if match else None
        if metric is None:
            reason = f"unknown metric {match.group(1)!r}" if match else "expected METRIC:PCT"
            raise AdaptersError(
                f"--fail-on {spec!r}: {reason}. Use METRIC:PCT, e.g. --fail-on tokens_per_s:5%, "
                f"with a metric among: {', '.join(METRICS)}."
            )
        out.append((metric, float(match.group(2))))
    return out


# --------------------------------------------------------------------------------------------
# One report, relative to a reference strategy


@dataclass
class Relative:
    """One strategy's speed and peak memory relative to the reference strategy of the same report."""

    strategy: str
    reference: str
    speed: float  # tokens/s of strategy / tokens/s of reference (> 1: faster)
    speed_error: float  # ± on speed
    memory: float | None  # peak bytes of strategy / of reference

    @property
    def sentence(self) -> str:
        if self.speed >= 1:
            text = f"{self.strategy} ran {self.speed:.2f} ± {self.speed_error:.2f}× faster than {self.reference}"
        else:
            slower = 1 / self.speed
            error = self.speed_error / self.speed**2  # same relative error, on the inverse
            text = f"{self.strategy} ran {slower:.2f} ± {error:.2f}× slower than {self.reference}"
        if self.memory is not None:
            text += f", using {self.memory:.2f}× its peak memory"
        return text


def relative_to(report: ReportLike, reference: str) -> tuple[list[Relative], list[dict[str, Any]]]:
    """Every other ok strategy against ``reference``, and the strategies that were not ok."""
    report = as_report(report)
    ok = _ok_results(report)
    if reference not in ok:
        status = next((r.status for r in report.results if r.strategy == reference), None)
        why = f"is {status} in this report" if status else "is not in this report"
        raise AdaptersError(f"--reference {reference!r} {why}. Choose one of the ok strategies: "
                            f"{', '.join(ok) or 'none'}.")
    ref = ok[reference]
    out = []
    for name, r in ok.items():
        if name == reference:
            continue
        speed = r.tokens_per_s / ref.tokens_per_s
        error = speed * math.hypot(r.step_s.spread / 2, ref.step_s.spread / 2)
        ref_peak = ref.memory.peak_bytes
        memory = r.memory.peak_bytes / ref_peak if ref_peak else None
        out.append(Relative(name, reference, speed, error, memory))
    skipped = [{"strategy": r.strategy, "status": r.status, "message": r.message}
               for r in report.results if not r.ok]
    return out, skipped
