"""Benchmark reports for people: a self-contained HTML page with charts, or GitHub markdown tables.

`render_html` draws, with matplotlib (imported only here, on the headless Agg/SVG path), four
charts as inline SVG: tokens/s per strategy, peak memory per strategy stacked by component, the
memory/speed Pareto chart, and held-out quality against memory when the reports measured it. Below
them come, per report, a results table (every strategy, with the message of those that did not
run) and a provenance table. `render_markdown` gives the same tables in GitHub markdown.

Reports are untrusted input: every piece of text from them is escaped, numbers are used only when
they are real numbers, and a field that is missing or of the wrong type shows as a dash rather than
failing. The page loads nothing from anywhere and runs no script; its Content-Security-Policy
forbids both.
"""
from __future__ import annotations

import html
import os
import shlex
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import AdaptersError
from .reports import METRICS, load_report

__all__ = ["FORMATS", "render_html", "render_markdown", "write_report", "format_for"]

FORMATS = ("html", "markdown")
_SUFFIXES = {".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown"}
_FORMAT_ALIASES = {"html": "html", "htm": "html", "markdown": "markdown", "md": "markdown"}

# Memory components in stacking order (bottom first), with their chart labels and colours.
COMPONENTS = [
    ("base_weights_quantized", "base weights (quantized)", "#1f4e79"),
    ("base_weights_unquantized", "base weights (unquantized)", "#6fa8dc"),
    ("trainable_parameters", "trainable parameters", "#38a169"),
    ("gradients", "gradients", "#f6ad55"),
    ("optimizer_state", "optimizer state", "#c05621"),
    ("activations_and_temporaries", "activations and temporaries", "#a0aec0"),
]
_SHORT = {"base_weights_quantized": "base q", "base_weights_unquantized": "base", "trainable_parameters": "train",
          "gradients": "grad", "optimizer_state": "optim", "activations_and_temporaries": "act"}
_REPORT_COLORS = ["#2b6cb0", "#dd6b20", "#2f855a", "#9b2c2c", "#6b46c1", "#b7791f", "#2c7a7b", "#97266d"]
_DASH = "–"


# --------------------------------------------------------------------------------------------
# Reading untrusted values


def _num(value: Any) -> float | None:
    """A real, finite number, or None (bools, strings and the like are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    if value is None:
        return _DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _results(report: dict[str, Any]) -> list[dict[str, Any]]:
    results = report.get("results")
    return [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []


def _ok(result: dict[str, Any]) -> bool:
    return result.get("status") == "ok"


def _strategy(result: dict[str, Any]) -> str:
    return _str(result.get("strategy"))


def _quality_ok(result: dict[str, Any]) -> dict[str, Any] | None:
    quality = _dict(result.get("quality"))
    return quality if _ok(result) and quality.get("status") == "ok" else None


def report_label(report: dict[str, Any]) -> str:
    """A short name for a report: its model and the machine it ran on."""
    settings, prov = _dict(report.get("settings")), _dict(report.get("provenance"))
    gpu = _dict(prov.get("gpu"))
    where = gpu.get("name") if gpu else settings.get("device")
    return f"{_str(settings.get('model'))}" + (f" on {_str(where)}" if where else "")


def _labels(reports: Sequence[dict[str, Any]]) -> list[str]:
    labels = [report_label(r) for r in reports]
    if len(set(labels)) < len(labels):  # same model and machine: tell them apart by time, then by number
        labels = [f"{label}, {_str(r.get('created'))}" for label, r in zip(labels, reports)]
    if len(set(labels)) < len(labels):
        labels = [f"#{i + 1} {label}" for i, label in enumerate(labels)]
    return labels


# --------------------------------------------------------------------------------------------
# Formatting numbers


def _bytes(n: float | None) -> str:
    if n is None:
        return _DASH
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def _memory_unit(values: list[float]) -> tuple[str, float]:
    """MiB for the charts, GiB once the largest value reaches 2 GiB."""
    return ("GiB", 2.0**30) if values and max(values) >= 2 * 2**30 else ("MiB", 2.0**20)


def _rate(v: float | None) -> str:
    if v is None:
        return _DASH
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _seconds(v: float | None) -> str:
    if v is None:
        return _DASH
    return f"{v * 1000:,.1f} ms" if v < 1 else f"{v:,.2f} s"


def _step_time(result: dict[str, Any]) -> str:
    step = _dict(result.get("step_s"))
    median, spread = _num(step.get("median")), _num(step.get("spread"))
    if median is None:
        return _DASH
    # spread is (max - min) / median, so ± half of it brackets the repeats around the median
    return _seconds(median) + (f" ±{100 * spread / 2:.0f}%" if spread is not None else "")


def _trainable(result: dict[str, Any]) -> str:
    trainable, total = _num(result.get("trainable_parameters")), _num(result.get("total_parameters"))
    if trainable is None:
        return _DASH
    text = f"{trainable:,.0f}"
    if total:
        text += f" ({100 * trainable / total:.3g}%)"
    return text


def _components(result: dict[str, Any]) -> str:
    comps = _dict(_dict(result.get("memory")).get("components"))
    values = [(key, _num(comps.get(key))) for key, _, _ in COMPONENTS]
    values = [(key, v) for key, v in values if v]
    if not values:
        return _DASH
    top = _num(_dict(result.get("memory")).get("peak_bytes")) or max(abs(v) for _, v in values)
    unit, scale = next(((u, s) for u, s in (("GiB", 2.0**30), ("MiB", 2.0**20)) if top >= s), ("KiB", 2.0**10))
    return " · ".join(f"{_SHORT[key]} {v / scale:,.2f}" for key, v in values) + f" {unit}"


def _quality(result: dict[str, Any]) -> str:
    quality = _dict(result.get("quality"))
    if not quality:
        return _DASH
    if quality.get("status") != "ok":
        return f"{_str(quality.get('status'))}"
    before, after = _dict(quality.get("before")), _dict(quality.get("after"))
    parts = []
    for key in ("loss", "accuracy"):
        b, a = _num(before.get(key)), _num(after.get(key))
        if a is not None:
            parts.append(f"{key} {b:.4g} → {a:.4g}" if b is not None else f"{key} {a:.4g}")
    return ", ".join(parts) or _DASH


def _notes(result: dict[str, Any]) -> str:
    if not _ok(result):
        return _str(result.get("message")) if result.get("message") is not None else ""
    flags = result.get("flags")
    return "; ".join(_str(f) for f in flags) if isinstance(flags, list) else ""


def _any(reports: Sequence[dict[str, Any]] | dict[str, Any], metric: str) -> bool:
    items = [reports] if isinstance(reports, dict) else reports
    return any(METRICS[metric].get(r) is not None for rep in items for r in _results(rep) if _ok(r))


def _results_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a report's results table (text, not yet escaped)."""
    mfu, energy = _any(report, "mfu"), _any(report, "energy_per_token")
    quality = any(_dict(r.get("quality")) for r in _results(report))
    planned = any(_dict(r.get("prediction")) for r in _results(report))
    headers = ["strategy", "status", "trainable params", "step time (median ±½ spread)", "tokens/s",
               "peak memory"] + ["plan's prediction (error)"] * planned + ["memory components"]
    headers += ["MFU"] * mfu + ["energy/token"] * energy + ["held-out quality"] * quality + ["flags / message"]
    rows = []
    for r in _results(report):
        if not _ok(r):
            cells = [_strategy(r), _str(r.get("status"))] + [""] * (len(headers) - 3) + [_notes(r)]
            rows.append(cells)
            continue
        m = _num(METRICS["mfu"].get(r))
        e = _num(METRICS["energy_per_token"].get(r))
        cells = [_strategy(r), "ok", _trainable(r), _step_time(r), _rate(METRICS["tokens_per_s"].get(r)),
                 _bytes(METRICS["peak_memory"].get(r))] + [_prediction(r)] * planned + [_components(r)]
        cells += ([f"{100 * m:.1f}%" if m is not None else _DASH] if mfu else [])
        cells += ([f"{e:.3g} J" if e is not None else _DASH] if energy else [])
        cells += ([_quality(r)] if quality else []) + [_notes(r)]
        rows.append(cells)
    return headers, rows


def _prediction(result: dict[str, Any]) -> str:
    prediction = _dict(result.get("prediction"))
    if not prediction:
        return _DASH
    if prediction.get("status") != "ok":
        return _str(prediction.get("status"))
    error = _num(_dict(prediction.get("error_pct")).get("total"))
    return _bytes(prediction.get("peak_bytes")) + (f" ({error:+.1f}%)" if error is not None else "")


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_str(v) if not isinstance(v, list) else ','.join(map(_str, v))}"
                     for k, v in settings.items())


def _provenance_rows(report: dict[str, Any], source: str | None = None) -> list[tuple[str, str]]:
    prov, settings = _dict(report.get("provenance")), _dict(report.get("settings"))
    commit = _str(prov.get("commit"))
    if prov.get("dirty") is True:
        commit += " (dirty: uncommitted changes)"
    command = prov.get("command")
    command = shlex.join(map(str, command)) if isinstance(command, list) else _str(command)
    cpu, gpu = _dict(prov.get("cpu")), prov.get("gpu")
    if isinstance(gpu, dict):
        mem = _num(gpu.get("memory_bytes"))
        gpu_text = f"{_str(gpu.get('count'))} × {_str(gpu.get('name'))}" + (f", {_bytes(mem)}" if mem else "")
    else:
        gpu_text = "none" if gpu is None else _str(gpu)

    def pairs(value: Any) -> str:
        return ", ".join(f"{k} {_str(v)}" for k, v in value.items()) if isinstance(value, dict) else _str(value)

    rows = [("source", source)] if source else []
    rows += [
        ("created", _str(report.get("created"))),
        ("schema version", _str(report.get("schema_version"))),
        ("commit", commit),
        ("command", command),
        ("seed", _str(prov.get("seed"))),
        ("python", _str(prov.get("python"))),
        ("OS", _str(prov.get("os"))),
        ("CPU", f"{_str(cpu.get('model'))}, {_str(cpu.get('cores'))} cores" if cpu else _str(prov.get("cpu"))),
        ("GPU", gpu_text),
        ("versions", pairs(prov.get("versions"))),
        ("plugins", pairs(prov.get("plugins"))),
        ("settings", _settings_text(settings)),
    ]
    return rows


def _summary(report: dict[str, Any]) -> str:
    s = _dict(report.get("settings"))
    parts = [f"model {_str(s.get('model'))}", f"device {_str(s.get('device'))}", f"dtype {_str(s.get('dtype'))}",
             f"batch {_str(s.get('batch_size'))} × seq {_str(s.get('seq_len'))}",
             f"{_str(s.get('steps'))} timed steps × {_str(s.get('repeats'))} repeats after "
             f"{_str(s.get('warmup'))} warm-up",
             f"gradient checkpointing {_str(s.get('gradient_checkpointing'))}"]
    if s.get("quality_steps"):
        parts.append(f"quality over {_str(s.get('quality_steps'))} steps")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Markdown


def _md(text: str) -> str:
    """A table cell: HTML-escaped (GitHub renders inline HTML), pipes escaped, one line."""
    text = html.escape(text, quote=False).replace("|", "\\|")
    return " ".join(text.split()) or " "


def _md_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(_md(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(reports: list[dict[str, Any]], *, sources: Sequence[str] | None = None) -> str:
    """The reports' results and provenance as GitHub-flavoured markdown tables."""
    if not reports:
        raise AdaptersError("no reports to render. Give at least one report written by `adapters bench`.")
    labels = _labels(reports)
    out = ["# adapters benchmark report", ""]
    for i, (report, label) in enumerate(zip(reports, labels)):
        source = sources[i] if sources else None
        out += [f"## {_md(label)}" + (f" ({_md(source)})" if source else ""), "", _md(_summary(report)), ""]
        headers, rows = _results_rows(report)
        out += [_md_table(headers, rows, right={2, 3, 4, 5}) if rows else "_No results._", ""]
        provenance = _md_table(["field", "value"], [[k, v] for k, v in _provenance_rows(report, source)])
        out += ["<details><summary>Provenance</summary>", "", provenance, "", "</details>", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Charts


def _ok_groups(reports: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [[r for r in _results(rep) if _ok(r)] for rep in reports]


def _pareto(points: list[tuple[float, float]], y_higher_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (x: lower is better)."""
    sign = 1 if y_higher_better else -1
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and sign * y2 >= sign * y) and (x2 < x or sign * y2 > sign * y)
            for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


class _Charts:
    """Makes matplotlib figures and turns them into inline SVG, each with its own id namespace."""

    def __init__(self) -> None:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:  # never switch a backend someone else chose
            matplotlib.use("Agg")
        from matplotlib.figure import Figure

        self.matplotlib, self.Figure, self.count = matplotlib, Figure, 0

    def figure(self, width: float, height: float):
        return self.Figure(figsize=(width, height), layout="constrained")

    def svg(self, fig, title: str) -> str:
        import io

        self.count += 1
        buf = io.StringIO()
        rc = {"svg.fonttype": "none", "svg.hashsalt": f"adapters-chart-{self.count}"}
        with self.matplotlib.rc_context(rc):
            fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
        text = buf.getvalue()
        text = text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: this is inline SVG
        text = text.replace("<style type=\"text/css\">*{", "<style type=\"text/css\">svg *{", 1)  # not the page
        return text.replace("<svg ", f'<svg role="img" aria-label="{html.escape(title)}" ', 1)


_RC = {
    "font.size": 10, "axes.titlesize": 12, "axes.titleweight": "bold", "axes.labelsize": 10,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e2e8f0",
    "axes.axisbelow": True, "legend.fontsize": 9, "legend.frameon": False, "text.parse_math": False,
    "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
}


def _bar_panels(charts: _Charts, groups: list[list[dict[str, Any]]], labels: list[str], metric: str):
    """One horizontal-bar panel per report that has ``metric``, sharing the x axis when the scales compare.

    Returns the figure and (axes, report index, results, values) per panel, top to bottom.
    """
    panels = []
    for i, group in enumerate(groups):
        rows = [(r, METRICS[metric].get(r)) for r in group]
        rows = [(r, v) for r, v in rows if v is not None]
        if rows:
            panels.append((i, [r for r, _ in rows], [v for _, v in rows]))
    if not panels:
        return None, [], False
    maxima = [max(max(values), 1e-300) for _, _, values in panels]
    shared = max(maxima) / min(maxima) <= 10  # else a small-model report would be invisible next to a big one
    several = len(panels) > 1
    heights = [len(results) + 0.6 * several for _, results, _ in panels]
    fig = charts.figure(9, 1.1 + 0.34 * sum(heights) + 0.45 * (several and not shared) * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=shared, height_ratios=heights, squeeze=False)[:, 0]
    out = []
    for ax, (i, results, values) in zip(axes, panels):
        ax.set_yticks(range(len(results)), [_strategy(r) for r in results])
        ax.set_ylim(len(results) - 0.4, -0.6)
        ax.tick_params(axis="y", length=0)
        ax.grid(axis="y", visible=False)
        if several:
            ax.set_title(labels[i], loc="left", fontsize=10, color=_REPORT_COLORS[i % len(_REPORT_COLORS)])
        out.append((ax, i, results, values))
    return fig, out, shared


def _chart_tokens(charts: _Charts, groups, labels) -> str | None:
    from matplotlib.ticker import FuncFormatter

    fig, panels, shared = _bar_panels(charts, groups, labels, "tokens_per_s")
    if fig is None:
        return None
    several = len(panels) > 1
    top = max(max(values) for _, _, _, values in panels)
    for n, (ax, i, _, values) in enumerate(panels):
        color = _REPORT_COLORS[i % len(_REPORT_COLORS)] if several else _REPORT_COLORS[0]
        ax.barh(range(len(values)), values, height=0.7, color=color)
        for y, v in enumerate(values):
            ax.text(v, y, f" {_rate(v)}", va="center", ha="left", fontsize=9)
        ax.set_xlim(0, ((top if shared else max(values)) or 1) * 1.15)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _rate(v)))
        if not shared or n == len(panels) - 1:
            ax.set_xlabel("training tokens per second (higher is better)")
    fig.suptitle("Throughput", x=0.01, ha="left", fontsize=12, fontweight="bold")
    return charts.svg(fig, "Tokens per second per strategy")


def _chart_memory(charts: _Charts, groups, labels) -> str | None:
    fig, panels, shared = _bar_panels(charts, groups, labels, "peak_memory")
    if fig is None:
        return None
    all_peaks = [v for _, _, _, values in panels for v in values]
    drawn: set[str] = set()
    for n, (ax, _, results, peaks) in enumerate(panels):
        unit, scale = _memory_unit(all_peaks if shared else peaks)
        left = [0.0] * len(results)
        for key, label, color in COMPONENTS:
            # a negative remainder (measurement noise) cannot be drawn as a stack segment: shown as 0
            widths = [max(_num(_dict(_dict(r.get("memory")).get("components")).get(key)) or 0.0, 0.0) / scale
                      for r in results]
            if any(widths):
                ax.barh(range(len(results)), widths, left=left, height=0.7, color=color, edgecolor="white",
                        linewidth=0.5, label=None if key in drawn else label)
                drawn.add(key)
                left = [a + b for a, b in zip(left, widths)]
        for y, (peak, stacked) in enumerate(zip(peaks, left)):
            ax.text(max(peak / scale, stacked), y, f" {peak / scale:,.3g}", va="center", ha="left", fontsize=9)
        predicted = [(y, _num(_dict(r.get("prediction")).get("peak_bytes"))) for y, r in enumerate(results)]
        predicted = [(y, v / scale) for y, v in predicted if v is not None]
        if predicted:  # the plan's prediction, as a tick across each bar
            ax.scatter([v for _, v in predicted], [y for y, _ in predicted], marker="|", s=400, color="black",
                       linewidths=2, zorder=3, label=None if "plan" in drawn else "adapters plan's prediction")
            drawn.add("plan")
        ends = [max(p / scale, s) for p, s in zip(peaks, left)]
        if not shared or n == 0:
            top = max(max(p for p in (all_peaks if shared else peaks)) / scale, max(ends))
            ax.set_xlim(0, (top or 1) * 1.15)
        if not shared or n == len(panels) - 1:
            ax.set_xlabel(f"peak memory during a training step ({unit}; lower is better)")
    handles = {}
    for ax, _, _, _ in panels:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    order = [label for _, label, _ in COMPONENTS if label in handles] + \
        [label for label in handles if label == "adapters plan's prediction"]
    fig.legend([handles[label] for label in order], order, loc="outside lower center", ncols=3)
    fig.suptitle("Peak memory by component", x=0.01, ha="left", fontsize=12, fontweight="bold")
    return charts.svg(fig, "Peak memory per strategy, stacked by component")


_LABEL_SPOTS = [  # (dx, dy) in points, horizontal and vertical alignment: nearest spots first
    (7, 4, "left", "bottom"), (7, -4, "left", "top"), (-7, 4, "right", "bottom"), (-7, -4, "right", "top"),
    (0, 9, "center", "bottom"), (0, -9, "center", "top"), (9, 16, "left", "bottom"), (9, -16, "left", "top"),
    (-9, 16, "right", "bottom"), (-9, -16, "right", "top"), (0, 24, "center", "bottom"), (0, -24, "center", "top"),
]


def _place_labels(fig, ax, items: list[tuple[float, float, str, dict[str, Any]]]) -> None:
    """Annotate points, each label at the nearest spot that overlaps no other label or point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # lay the figure out, so display coordinates are final
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    points = [ax.transData.transform((x, y)) for x, y, _, _ in items]
    obstacles = [(px - 5, py - 5, px + 5, py + 5) for px, py in points]
    obstacles += [tuple(t.get_window_extent(renderer).extents) for t in ax.texts]

    def cost(box) -> float:
        x0, y0, x1, y1 = box
        outside = max(frame.x0 - x0, 0) + max(x1 - frame.x1, 0) + max(frame.y0 - y0, 0) + max(y1 - frame.y1, 0)
        overlap = sum(max(min(x1, b[2]) - max(x0, b[0]), 0) * max(min(y1, b[3]) - max(y0, b[1]), 0)
                      for b in obstacles)
        return overlap + 1000 * outside

    for x, y, text, style in items:
        ann = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", **style)
        best = None
        for n, (dx, dy, ha, va) in enumerate(_LABEL_SPOTS):
            ann.set_position((dx, dy))
            ann.set_horizontalalignment(ha)
            ann.set_verticalalignment(va)
            box = tuple(ann.get_window_extent(renderer).expanded(1.0, 1.0).extents)
            c = cost(box)
            if best is None or c < best[0]:
                best = (c, n, box)
            if c == 0:
                break
        dx, dy, ha, va = _LABEL_SPOTS[best[1]]
        ann.set_position((dx, dy))
        ann.set_horizontalalignment(ha)
        ann.set_verticalalignment(va)
        obstacles.append(best[2])


def _scatter(charts: _Charts, groups, labels, y_metric: str, title: str, ylabel: str, aria: str,
             y_higher_better: bool) -> str | None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    series = []
    for i, group in enumerate(groups):
        pts = [(METRICS["peak_memory"].get(r), METRICS[y_metric].get(r), _strategy(r)) for r in group]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if pts:
            series.append((i, pts))
    if not series:
        return None
    unit, scale = _memory_unit([p[0] for _, pts in series for p in pts])
    fig = charts.figure(9, 5.2)
    ax = fig.add_subplot()
    several = len(series) > 1
    all_y = [p[1] for _, pts in series for p in pts]
    labelled = []
    for i, pts in series:
        color = _REPORT_COLORS[i % len(_REPORT_COLORS)]
        xy = [(x / scale, y) for x, y, _ in pts]
        front = _pareto(xy, y_higher_better)
        others = [k for k in range(len(xy)) if k not in front]
        ax.plot([xy[k][0] for k in front], [xy[k][1] for k in front], "-", color=color, linewidth=1.5, alpha=0.6,
                zorder=2)
        ax.scatter([xy[k][0] for k in front], [xy[k][1] for k in front], s=70, color=color, zorder=3,
                   edgecolor="white", linewidth=1, label=(f"{labels[i]}: " if several else "") + "Pareto-optimal")
        if others:
            ax.scatter([xy[k][0] for k in others], [xy[k][1] for k in others], s=50, facecolor="white",
                       edgecolor=color if several else "#718096", linewidth=1.5, zorder=3,
                       label=(f"{labels[i]}: " if several else "") + "dominated")
        for k in front + others:
            style = {"fontsize": 9, "fontweight": "bold" if k in front else "normal",
                     "color": "#1a202c" if k in front else "#4a5568"}
            labelled.append((xy[k][0], xy[k][1], pts[k][2], style))
    all_x = [x / scale for _, pts in series for x, _, _ in pts]
    for values, axis, set_scale, fmt in ((all_y, ax.yaxis, ax.set_yscale, _rate),
                                         (all_x, ax.xaxis, ax.set_xscale, lambda v: f"{v:,.3g}")):
        if min(values) > 0 and max(values) / min(values) > 30:  # e.g. a small model's report beside a big one
            set_scale("log")
            axis.set_major_formatter(FuncFormatter(lambda v, _, fmt=fmt: fmt(v)))
            axis.set_minor_formatter(NullFormatter())
    if y_metric == "tokens_per_s" and ax.get_yscale() == "linear":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _rate(v)))
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel(f"peak memory ({unit}; lower is better)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left")
    ax.text(0.01, 0.98 if y_higher_better else 0.02, "better ↖" if y_higher_better else "better ↙",
            transform=ax.transAxes, ha="left", va="top" if y_higher_better else "bottom", color="#718096")
    _place_labels(fig, ax, labelled)
    ax.legend(loc="best")
    return charts.svg(fig, aria)


def _charts(reports: Sequence[dict[str, Any]], labels: list[str]) -> list[tuple[str, str, str]]:
    """(title, caption, inline SVG) for each chart the reports have data for."""
    groups = _ok_groups(reports)
    charts = _Charts()
    out = []
    with charts.matplotlib.rc_context(_RC):
        svg = _chart_tokens(charts, groups, labels)
        if svg:
            out.append(("Throughput", "Median training tokens per second of each strategy that ran"
                        + (", one group per report." if len(reports) > 1 else "."), svg))
        svg = _chart_memory(charts, groups, labels)
        if svg:
            out.append(("Peak memory", "Peak memory of a training step, split into what holds it; the number "
                        "is the measured peak; a black tick marks adapters plan's prediction.", svg))
        svg = _scatter(charts, groups, labels, "tokens_per_s", "Speed against memory", "tokens/s (higher is better)",
                       "Pareto chart of peak memory against tokens per second", True)
        if svg:
            out.append(("Speed against memory", "Filled points are Pareto-optimal: no other strategy"
                        + (" in the same report" if len(reports) > 1 else "")
                        + " uses less memory and is faster. The line joins them.", svg))
        quality_groups = [[r for r in g if _quality_ok(r)] for g in groups]
        metric = "heldout_loss" if any(METRICS["heldout_loss"].get(r) is not None for g in quality_groups for r in g) \
            else "accuracy"
        svg = _scatter(charts, quality_groups, labels, metric, "Quality against memory",
                       "held-out loss after training (lower is better)" if metric == "heldout_loss"
                       else "held-out accuracy after training (higher is better)",
                       "Held-out quality against peak memory", metric == "accuracy")
        if svg:
            out.append(("Quality against memory", "Held-out " + ("loss" if metric == "heldout_loss" else "accuracy")
                        + " after the quality steps, against peak memory; filled points are Pareto-optimal.", svg))
    return out


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Liberation Sans", sans-serif; margin: 0;
       color: #1a202c; background: #f7fafc; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 1.6em; margin: 0.2em 0 0.3em; }
h2 { font-size: 1.25em; margin: 1.6em 0 0.4em; border-bottom: 1px solid #cbd5e0; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
figure { background: #fff; border: 1px solid #e2e8f0; border-radius: 6px; margin: 16px 0; padding: 12px 16px; }
figure svg { width: 100%; height: auto; max-width: 980px; display: block; margin: 0 auto; }
figcaption { color: #4a5568; font-size: 0.9em; margin-top: 6px; }
table { border-collapse: collapse; background: #fff; font-size: 0.86em; width: 100%; margin: 8px 0 16px; }
th, td { border: 1px solid #e2e8f0; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #edf2f7; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
tr.not-ok td { background: #fffaf0; }
td.nowrap { white-space: nowrap; }
td.comp { min-width: 15em; }
td.status-ok { color: #276749; font-weight: 600; }
td.status-bad { color: #9c4221; font-weight: 600; }
table.provenance th { width: 10em; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.95em;
       word-break: break-all; }
.summary { color: #4a5568; }
ul.reports { padding-left: 1.2em; }
"""


def _e(text: Any) -> str:
    return html.escape(_str(text), quote=True)


def _html_table(headers: list[str], rows: list[list[str]], numeric: set[int], bad: list[bool]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row, not_ok in zip(rows, bad):
        cells = []
        for j, cell in enumerate(row):
            if j in numeric:
                cls = "num"
            elif j == 1:
                cls = "status-bad" if not_ok else "status-ok"
            else:
                cls = {0: "nowrap"}.get(j) or {"held-out quality": "nowrap", "memory components": "comp"}.get(
                    headers[j], "")
            cells.append(f'<td class="{cls}">{_e(cell)}</td>' if cls else f"<td>{_e(cell)}</td>")
        body.append(f'<tr class="{"not-ok" if not_ok else "ok"}">' + "".join(cells) + "</tr>")
    return f"<table class=\"results\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(reports: list[dict[str, Any]], *, sources: Sequence[str] | None = None) -> str:
    """One self-contained HTML page: charts as inline SVG, then results and provenance per report."""
    if not reports:
        raise AdaptersError("no reports to render. Give at least one report written by `adapters bench`.")
    labels = _labels(reports)
    title = "adapters benchmark report" + (f": {labels[0]}" if len(reports) == 1 else f" ({len(reports)} reports)")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing is fetched and no script runs, even if something slipped through escaping.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        '<ul class="reports">',
    ]
    for i, (report, label) in enumerate(zip(reports, labels)):
        source = f" ({sources[i]})" if sources else ""
        color = _REPORT_COLORS[i % len(_REPORT_COLORS)] if len(reports) > 1 else "#1a202c"
        parts.append(f'<li><a href="#report-{i + 1}" style="color:{color}">{_e(label)}</a>{_e(source)}: '
                     f'<span class="summary">{_e(_summary(report))}</span></li>')
    parts.append("</ul>")
    charts = _charts(reports, labels)
    if charts:
        for name, caption, svg in charts:
            parts.append(f"<figure>{svg}<figcaption><b>{_e(name)}.</b> {_e(caption)}</figcaption></figure>")
    else:
        parts.append("<p><em>No strategy ran successfully, so there is nothing to chart.</em></p>")
    for i, (report, label) in enumerate(zip(reports, labels)):
        source = sources[i] if sources else None
        parts.append(f'<h2 id="report-{i + 1}">{_e(label)}</h2><p class="summary">{_e(_summary(report))}</p>')
        headers, rows = _results_rows(report)
        parts.append("<h3>Results</h3>")
        if rows:
            bad = [not _ok(r) for r in _results(report)]
            parts.append(_html_table(headers, rows, {2, 3, 4, 5}, bad))
        else:
            parts.append("<p><em>No results.</em></p>")
        parts.append('<h3>Provenance</h3><table class="provenance"><tbody>')
        for key, value in _provenance_rows(report, source):
            cell = f"<code>{_e(value)}</code>" if key in ("command", "commit") else _e(value)
            parts.append(f"<tr><th>{_e(key)}</th><td>{cell}</td></tr>")
        parts.append("</tbody></table>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Files


def format_for(output: str | os.PathLike[str] | None, format: str | None) -> str:
    """'html' or 'markdown': ``format`` when given, else from the output's suffix, else markdown."""
    if format is not None:
        fmt = _FORMAT_ALIASES.get(format.strip().lower())
        if fmt is None:
            raise AdaptersError(f"--format {format}: unknown. Use html or markdown.")
        return fmt
    if output is None:
        return "markdown"
    suffix = Path(output).suffix.lower()
    if suffix not in _SUFFIXES:
        raise AdaptersError(
            f"--output {output}: cannot tell the format from the suffix {suffix or '(none)'!r}. "
            "Name it .html or .md, or pass --format html|markdown."
        )
    return _SUFFIXES[suffix]


def _check_output(output: Path, overwrite: bool) -> None:
    if output.is_dir():
        raise AdaptersError(f"--output {output}: is a directory. Give a file name such as report.html.")
    if output.exists() and not overwrite:
        raise AdaptersError(f"--output {output}: exists. Choose a new file name, or pass --overwrite.")


def write_report(paths: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str] | None = None,
                 format: str | None = None, *, overwrite: bool = False) -> str:
    """Load the reports at ``paths``, render them, and write ``output`` atomically; returns the text.

    Without ``output`` nothing is written (the CLI prints the text). An existing ``output`` is
    refused unless ``overwrite``; the file is written to a temporary name beside it and renamed
    into place, so readers never see half a page.
    """
    fmt = format_for(output, format)
    if not paths:
        raise AdaptersError("no reports given. Pass one or more report files written by `adapters bench`.")
    out = Path(output) if output is not None else None
    if out is not None:
        _check_output(out, overwrite)
    reports = [load_report(p) for p in paths]
    sources = [str(p) for p in paths]
    if len({Path(s).name for s in sources}) == len(sources):
        sources = [Path(s).name for s in sources]
    text = (render_html if fmt == "html" else render_markdown)(reports, sources=sources)
    if out is None:
        return text
    _check_output(out, overwrite)  # again: rendering takes a moment and someone may have written it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return text
