"""Compare benchmark reports: two runs of the same suite, or strategies within one run.

``compare_reports(base, new)`` matches results by their ``strategy`` spec (e.g. ``"lora@nf4"``),
compares every metric in `adapters.reports.METRICS` for the strategies that are ``ok`` in both, and
calls each change ``better``, ``worse`` or ``noise``.

The noise rule. Every row gets a *noise band*, an interval of new/base ratios that count as noise:

* Timed metrics (``Metric.timed``: tokens/s, step time, MFU, energy/token) are derived from step
  times, so each run's spread of step times bounds them: a run whose median step took ``m`` and
  whose steps took ``min``..``max`` could have measured the metric anywhere between its values at
  ``min`` and at ``max`` (``value * min/m`` .. ``value * max/m`` for step time and energy,
  ``value * m/max`` .. ``value * m/min`` for tokens/s and MFU). The change is noise when the two
  runs' ranges overlap, i.e. when some step of one run was as fast as some step of the other. The
  band never narrows below ±2% (`TIMED_FLOOR`): run-to-run drift (clocks, thermals, other load)
  that a single report's spread cannot show.
* Untimed metrics use a fixed relative tolerance (`TOLERANCE`): 1% for peak memory (allocations
  are nearly deterministic), 10% for load time (file cache, disk), 1% for held-out loss and
  accuracy.

``--reference`` (`relative_to`) states every strategy of one report against a reference strategy,
hyperfine-style. Its ± propagates both runs' uncertainties as relative errors added in quadrature
(as hyperfine does with standard deviations), taking a run's uncertainty as half its spread, the
``±`` that ``adapters bench`` prints: ``± = ratio * sqrt((spread_a/2)**2 + (spread_b/2)**2)``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import AdaptersError
from .reports import METRICS, Metric, load_report
from .text import aligned_table

TIMED_FLOOR = 0.02
TOLERANCE = {"peak_memory": 0.01, "load_time": 0.10, "heldout_loss": 0.01, "accuracy": 0.01}
DEFAULT_TOLERANCE = 0.01  # an untimed metric added to METRICS without its own tolerance
# Timed metrics that grow as steps get faster (value ∝ 1/step time); the others grow with step time.
_INVERSE_TO_STEP_TIME = {"tokens_per_s", "mfu"}

MARKS = {"better": "+", "worse": "!", "noise": "~", "n/a": "?"}
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
COMPARED_SETTINGS = ("model", "device", "dtype", "batch_size", "gradient_accumulation_steps", "effective_batch_size",
                     "seq_len", "gradient_checkpointing", "quality_steps")


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
                                         f"{r.strategy}: {r.label} {shown} ({_fmt(r.metric, r.base)} -> "
                                         f"{_fmt(r.metric, r.new)}), beyond --fail-on {spec}"))
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


def _direction(metric: Metric) -> str:
    return "higher is better" if metric.higher_is_better else "lower is better"


def _relative_range(metric: Metric, result: dict[str, Any]) -> tuple[float, float]:
    """The metric's possible values within the run's step-time range, relative to its reported value."""
    step = result["step_s"]
    low, high = step["min"] / step["median"], step["max"] / step["median"]
    return (1 / high, 1 / low) if metric.name in _INVERSE_TO_STEP_TIME else (low, high)


def noise_band(metric: Metric, base_result: dict[str, Any], new_result: dict[str, Any]) -> tuple[float, float]:
    """The new/base ratios of ``metric`` that count as noise (see the module docstring)."""
    if not metric.timed:
        tol = TOLERANCE.get(metric.name, DEFAULT_TOLERANCE)
        return 1 - tol, 1 + tol
    base_low, base_high = _relative_range(metric, base_result)
    new_low, new_high = _relative_range(metric, new_result)
    # base range [b*base_low, b*base_high] and new range [n*new_low, n*new_high] overlap
    # exactly when base_low/new_high <= n/b <= base_high/new_low.
    return min(base_low / new_high, 1 - TIMED_FLOOR), max(base_high / new_low, 1 + TIMED_FLOOR)


def _verdict(metric: Metric, base: float, new: float, band: tuple[float, float]) -> tuple[float | None, str]:
    if base == 0:
        if new == 0:
            return None, "noise"
        return None, "better" if (new > 0) == metric.higher_is_better else "worse"
    ratio = new / base
    if band[0] <= ratio <= band[1]:
        return ratio, "noise"
    return ratio, "better" if (new > base) == metric.higher_is_better else "worse"


def _ok_results(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["strategy"]: r for r in report["results"] if r.get("status") == "ok"}


def _all_results(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["strategy"]: r for r in report["results"]}


def _gpu_text(prov: dict[str, Any]) -> str:
    gpu = prov.get("gpu")
    if not gpu:
        return "no GPU"
    return f"{gpu.get('name')} ×{gpu.get('count')}"


def _shown(mapping: dict[str, Any], key: str) -> str:
    value = mapping.get(key)
    return "(absent)" if value is None else str(value)


def _warnings(base: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    bp, np_ = base["provenance"], new["provenance"]
    bg, ng = bp.get("gpu") or {}, np_.get("gpu") or {}
    if (bg.get("name"), bg.get("count")) != (ng.get("name"), ng.get("count")):
        out.append(f"different GPU: {_gpu_text(bp)} -> {_gpu_text(np_)}")
    elif not bg and bp.get("cpu") != np_.get("cpu"):
        bc, nc = bp.get("cpu") or {}, np_.get("cpu") or {}
        out.append(f"different CPU: {bc.get('model')} ({bc.get('cores')} cores) -> "
                   f"{nc.get('model')} ({nc.get('cores')} cores)")
    bv, nv = bp.get("versions") or {}, np_.get("versions") or {}
    changed = [f"{p} {_shown(bv, p)} -> {_shown(nv, p)}" for p in VERSIONED_PACKAGES if bv.get(p) != nv.get(p)]
    if changed:
        out.append("different package versions: " + ", ".join(changed))
    bs, ns = base["settings"], new["settings"]
    changed = [f"{k} {_shown(bs, k)} -> {_shown(ns, k)}" for k in COMPARED_SETTINGS if bs.get(k) != ns.get(k)]
    if changed:
        out.append("different settings: " + ", ".join(changed))
    for name, prov in (("base", bp), ("new", np_)):
        if prov.get("dirty"):
            commit = (prov.get("commit") or "unknown")[:12]
            out.append(f"{name} report ran on a dirty checkout (commit {commit} plus uncommitted changes)")
    return out


def _info(report: dict[str, Any]) -> dict[str, Any]:
    prov, settings = report["provenance"], report["settings"]
    return {"created": report.get("created"), "commit": prov.get("commit"), "dirty": prov.get("dirty"),
            "model": settings.get("model"), "device": settings.get("device"), "gpu": _gpu_text(prov)}


def compare_reports(base: dict[str, Any], new: dict[str, Any]) -> Comparison:
    """Every metric of every strategy that is ok in both reports, with a verdict; see the module docstring."""
    base_ok, new_ok = _ok_results(base), _ok_results(new)
    base_all, new_all = _all_results(base), _all_results(new)
    common = [s for s in base_ok if s in new_ok]
    if not common:
        raise AdaptersError(
            "the reports have no strategy that ran ok in both "
            f"(base ok: {', '.join(base_ok) or 'none'}; new ok: {', '.join(new_ok) or 'none'}). "
            "Compare reports of the same suite."
        )
    rows = []
    for strategy in common:
        b, n = base_ok[strategy], new_ok[strategy]
        for metric in METRICS.values():
            bv, nv = metric.get(b), metric.get(n)
            if bv is None and nv is None:
                continue
            if bv is None or nv is None:
                rows.append(Row(strategy, metric.name, metric.label, _direction(metric), bv, nv, None, None, "n/a"))
                continue
            band = noise_band(metric, b, n)
            ratio, verdict = _verdict(metric, bv, nv, band)
            rows.append(Row(strategy, metric.name, metric.label, _direction(metric), bv, nv, ratio,
                            [band[0], band[1]], verdict))
    not_compared = [{"strategy": s, "base": base_all[s]["status"], "new": new_all[s]["status"]}
                    for s in base_all if s in new_all and s not in common]
    return Comparison(
        rows=rows, warnings=_warnings(base, new),
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


def relative_to(report: dict[str, Any], reference: str) -> tuple[list[Relative], list[dict[str, Any]]]:
    """Every other ok strategy against ``reference``, and the strategies that were not ok."""
    ok = _ok_results(report)
    if reference not in ok:
        status = next((r["status"] for r in report["results"] if r["strategy"] == reference), None)
        why = f"is {status} in this report" if status else "is not in this report"
        raise AdaptersError(f"--reference {reference!r} {why}. Choose one of the ok strategies: "
                            f"{', '.join(ok) or 'none'}.")
    ref = ok[reference]
    out = []
    for name, r in ok.items():
        if name == reference:
            continue
        speed = r["tokens_per_s"] / ref["tokens_per_s"]
        error = speed * math.hypot(r["step_s"]["spread"] / 2, ref["step_s"]["spread"] / 2)
        ref_peak = ref["memory"]["peak_bytes"]
        memory = r["memory"]["peak_bytes"] / ref_peak if ref_peak else None
        out.append(Relative(name, reference, speed, error, memory))
    skipped = [{"strategy": r["strategy"], "status": r["status"], "message": r.get("message")}
               for r in report["results"] if r["status"] != "ok"]
    return out, skipped


# --------------------------------------------------------------------------------------------
# Text


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric == "peak_memory":
        return f"{value / 2**20:,.1f} MiB"
    if metric == "step_time":
        return f"{value * 1000:,.2f} ms"
    if metric == "tokens_per_s":
        return f"{value:,.0f} tok/s"
    if metric == "load_time":
        return f"{value:.2f} s"
    if metric == "mfu":
        return f"{100 * value:.2f}%"
    if metric == "energy_per_token":
        return f"{value:.4g} J"
    return f"{value:.4f}"


def _describe(label: str, path: str, info: dict[str, Any]) -> str:
    commit = (info.get("commit") or "unknown")[:7] + ("+dirty" if info.get("dirty") else "")
    return f"{label}: {path} ({info.get('created')}, commit {commit}, {info.get('model')}, {info.get('gpu')})"


def format_comparison(comparison: Comparison, base_label: str = "base", new_label: str = "new",
                      failures: list[Failure] | None = None) -> str:
    """The comparison as text: where each report came from, warnings, an aligned table, leftovers."""
    lines = [_describe("base", base_label, comparison.base_info), _describe("new ", new_label, comparison.new_info)]
    lines += [f"warning: {w}" for w in comparison.warnings]
    lines.append("")
    rows = []
    for r in comparison.rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        rows.append([r.strategy, r.label, _fmt(r.metric, r.base), _fmt(r.metric, r.new), ratio,
                     f"{r.mark} {r.verdict}", r.direction])
    lines.append(aligned_table(rows, ["strategy", "metric", "base", "new", "new/base", "verdict", "direction"]))
    if comparison.only_in_base:
        lines.append(f"only in base: {', '.join(comparison.only_in_base)}")
    if comparison.only_in_new:
        lines.append(f"only in new: {', '.join(comparison.only_in_new)}")
    for item in comparison.not_compared:
        lines.append(f"not compared: {item['strategy']} (base {item['base']}, new {item['new']})")
    lines.append(f"noise: timed metrics when the runs' step-time ranges overlap (at least ±{TIMED_FLOOR:.0%}); "
                 + ", ".join(f"{METRICS[k].label} ±{v:.0%}" for k, v in TOLERANCE.items()))
    for f in failures or []:
        lines.append(f"FAIL {f.message}")
    return "\n".join(lines)


def format_relative(relatives: list[Relative], skipped: list[dict[str, Any]]) -> str:
    lines = [r.sentence for r in relatives]
    lines += [f"{s['strategy']}: not compared ({s['status']}{': ' + s['message'] if s.get('message') else ''})"
              for s in skipped]
    return "\n".join(lines) if lines else "no other ok strategy to compare"


# --------------------------------------------------------------------------------------------
# The command


def run_compare(paths: list[str] | tuple[str, ...], reference: str | None = None,
                fail_on: list[str] | tuple[str, ...] = (), as_json: bool = False) -> tuple[str, int]:
    """What `adapters compare` prints, and its exit code (1 when a --fail-on threshold is exceeded)."""
    paths = list(paths)
    if reference is not None:
        if len(paths) != 1:
            raise AdaptersError(f"--reference compares strategies within one report; give exactly one report "
                                f"(got {len(paths)}), or drop --reference to compare BASE.json NEW.json.")
        if fail_on:
            raise AdaptersError("--fail-on needs two reports (BASE.json NEW.json); it does not apply to --reference.")
        relatives, skipped = relative_to(load_report(paths[0]), reference)
        if as_json:
            data = {"reference": reference, "strategies": [{**asdict(r), "sentence": r.sentence} for r in relatives],
                    "not_compared": skipped}
            return json.dumps(data, indent=2, allow_nan=False), 0
        return format_relative(relatives, skipped), 0
    if len(paths) != 2:
        raise AdaptersError(f"give two reports, BASE.json NEW.json (got {len(paths)}), "
                            "or one report with --reference STRATEGY.")
    thresholds = parse_fail_on(fail_on)
    comparison = compare_reports(load_report(paths[0]), load_report(paths[1]))
    failures = comparison.failures(thresholds)
    checked = {r.metric for r in comparison.rows if r.verdict != "n/a"}
    for metric, pct in thresholds:
        if metric.name not in checked:
            comparison.warnings.append(f"--fail-on {metric.name}:{pct:g}% checked nothing: "
                                       f"no common strategy has {metric.label} in both reports")
    code = 1 if failures else 0
    if as_json:
        data = {**comparison.to_dict(), "failures": [asdict(f) for f in failures]}
        return json.dumps(data, indent=2, allow_nan=False), code
    return format_comparison(comparison, paths[0], paths[1], failures), code
