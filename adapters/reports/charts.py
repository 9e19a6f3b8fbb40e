"""The HTML report's charts, drawn with matplotlib as inline SVG.

matplotlib is imported only inside these functions, on the headless Agg/SVG path, so importing
`adapters.reports` (or rendering markdown) never loads it. The charts: tokens/s per strategy with
the step-time spread as error bars, peak memory per strategy stacked by component, the
memory/speed Pareto chart, and held-out quality against memory when the reports measured it.
"""
from __future__ import annotations

import html
import io
import sys
from collections.abc import Sequence
from typing import Any

from .metrics import METRICS
from .model import OkResult, Report
from .tables import COMPONENTS, rate

REPORT_COLORS = ["#2b6cb0", "#dd6b20", "#2f855a", "#9b2c2c", "#6b46c1", "#b7791f", "#2c7a7b", "#97266d"]

_RC = {
    "font.size": 10, "axes.titlesize": 12, "axes.titleweight": "bold", "axes.labelsize": 10,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e2e8f0",
    "axes.axisbelow": True, "legend.fontsize": 9, "legend.frameon": False, "text.parse_math": False,
    "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
}
_LABEL_SPOTS = [  # (dx, dy) in points, horizontal and vertical alignment: nearest spots first
    (7, 4, "left", "bottom"), (7, -4, "left", "top"), (-7, 4, "right", "bottom"), (-7, -4, "right", "top"),
    (0, 9, "center", "bottom"), (0, -9, "center", "top"), (9, 16, "left", "bottom"), (9, -16, "left", "top"),
    (-9, 16, "right", "bottom"), (-9, -16, "right", "top"), (0, 24, "center", "bottom"), (0, -24, "center", "top"),
]

Groups = list[list[OkResult]]


def color(i: int) -> str:
    return REPORT_COLORS[i % len(REPORT_COLORS)]


def _memory_unit(values: list[float]) -> tuple[str, float]:
    """MiB for the charts, GiB once the largest value reaches 2 GiB."""
    return ("GiB", 2.0**30) if values and max(values) >= 2 * 2**30 else ("MiB", 2.0**20)


def pareto(points: list[tuple[float, float]], y_higher_better: bool) -> list[int]:
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
        self.count += 1
        buf = io.StringIO()
        rc = {"svg.fonttype": "none", "svg.hashsalt": f"adapters-chart-{self.count}"}
        with self.matplotlib.rc_context(rc):
            fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
        text = buf.getvalue()
        text = text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: this is inline SVG
        text = text.replace("<style type=\"text/css\">*{", "<style type=\"text/css\">svg *{", 1)  # not the page
        return text.replace("<svg ", f'<svg role="img" aria-label="{html.escape(title)}" ', 1)


# --------------------------------------------------------------------------------------------
# Bars: throughput and memory


def _bar_panels(charts: _Charts, groups: Groups, labels: list[str], metric: str):
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
        ax.set_yticks(range(len(results)), [r.strategy for r in results])
        ax.set_ylim(len(results) - 0.4, -0.6)
        ax.tick_params(axis="y", length=0)
        ax.grid(axis="y", visible=False)
        if several:
            ax.set_title(labels[i], loc="left", fontsize=10, color=color(i))
        out.append((ax, i, results, values))
    return fig, out, shared


def _step_errors(results: list[OkResult], values: list[float]) -> tuple[list[float], list[float]]:
    """How far tokens/s reaches below and above each value between the slowest and the fastest step."""
    low = [v - v * r.step_s.median / r.step_s.max for r, v in zip(results, values)]
    high = [v * r.step_s.median / r.step_s.min - v for r, v in zip(results, values)]
    return low, high


def _chart_tokens(charts: _Charts, groups: Groups, labels: list[str]) -> str | None:
    from matplotlib.ticker import FuncFormatter

    fig, panels, shared = _bar_panels(charts, groups, labels, "tokens_per_s")
    if fig is None:
        return None
    several = len(panels) > 1
    errors = [_step_errors(results, values) for _, _, results, values in panels]
    ends = [[v + h for v, h in zip(values, high)] for (_, _, _, values), (_, high) in zip(panels, errors)]
    top = max(max(e) for e in ends)
    for n, ((ax, i, _, values), (low, high), end) in enumerate(zip(panels, errors, ends)):
        ax.barh(range(len(values)), values, height=0.7, color=color(i) if several else REPORT_COLORS[0],
                xerr=[low, high], error_kw={"ecolor": "#1a202c", "elinewidth": 1, "capsize": 3})
        for y, (v, x) in enumerate(zip(values, end)):
            ax.text(x, y, f" {rate(v)}", va="center", ha="left", fontsize=9)
        ax.set_xlim(0, ((top if shared else max(end)) or 1) * 1.15)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: rate(v)))
        if not shared or n == len(panels) - 1:
            ax.set_xlabel("training tokens per second (higher is better)")
    fig.suptitle("Throughput", x=0.01, ha="left", fontsize=12, fontweight="bold")
    return charts.svg(fig, "Tokens per second per strategy, with the step-time spread as error bars")


def _stack_components(ax, results: list[OkResult], scale: float, drawn: set[str]) -> list[float]:
    """Draw each result's memory components as stacked bars; returns where each stack ends."""
    left = [0.0] * len(results)
    for key, label, fill in COMPONENTS:
        # a negative remainder (measurement noise) cannot be drawn as a stack segment: shown as 0
        widths = [max(getattr(r.memory.components, key), 0) / scale for r in results]
        if any(widths):
            ax.barh(range(len(results)), widths, left=left, height=0.7, color=fill, edgecolor="white",
                    linewidth=0.5, label=None if key in drawn else label)
            drawn.add(key)
            left = [a + b for a, b in zip(left, widths)]
    return left


def _mark_predictions(ax, results: list[OkResult], scale: float, drawn: set[str]) -> None:
    predicted = [(y, r.prediction.peak_bytes / scale) for y, r in enumerate(results)
                 if r.prediction is not None and r.prediction.peak_bytes is not None]
    if predicted:  # the plan's prediction, as a tick across each bar
        ax.scatter([v for _, v in predicted], [y for y, _ in predicted], marker="|", s=400, color="black",
                   linewidths=2, zorder=3, label=None if "plan" in drawn else "adapters plan's prediction")
        drawn.add("plan")


def _chart_memory(charts: _Charts, groups: Groups, labels: list[str]) -> str | None:
    fig, panels, shared = _bar_panels(charts, groups, labels, "peak_memory")
    if fig is None:
        return None
    all_peaks = [v for _, _, _, values in panels for v in values]
    drawn: set[str] = set()
    for n, (ax, _, results, peaks) in enumerate(panels):
        unit, scale = _memory_unit(all_peaks if shared else peaks)
        left = _stack_components(ax, results, scale, drawn)
        for y, (peak, stacked) in enumerate(zip(peaks, left)):
            ax.text(max(peak / scale, stacked), y, f" {peak / scale:,.3g}", va="center", ha="left", fontsize=9)
        _mark_predictions(ax, results, scale, drawn)
        ends = [max(p / scale, s) for p, s in zip(peaks, left)]
        if not shared or n == 0:
            top = max(max(p for p in (all_peaks if shared else peaks)) / scale, max(ends))
            ax.set_xlim(0, (top or 1) * 1.15)
        if not shared or n == len(panels) - 1:
            ax.set_xlabel(f"peak memory during a training step ({unit}; lower is better)")
    handles: dict[str, Any] = {}
    for ax, _, _, _ in panels:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    order = [label for _, label, _ in COMPONENTS if label in handles] + \
        [label for label in handles if label == "adapters plan's prediction"]
    fig.legend([handles[label] for label in order], order, loc="outside lower center", ncols=3)
    fig.suptitle("Peak memory by component", x=0.01, ha="left", fontsize=12, fontweight="bold")
    return charts.svg(fig, "Peak memory per strategy, stacked by component")


# --------------------------------------------------------------------------------------------
# Scatter: a metric against peak memory, with the Pareto front


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

    def place(ann, spot: int) -> None:
        dx, dy, ha, va = _LABEL_SPOTS[spot]
        ann.set_position((dx, dy))
        ann.set_horizontalalignment(ha)
        ann.set_verticalalignment(va)

    for x, y, text, style in items:
        ann = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", **style)
        best = None
        for n in range(len(_LABEL_SPOTS)):
            place(ann, n)
            box = tuple(ann.get_window_extent(renderer).expanded(1.0, 1.0).extents)
            c = cost(box)
            if best is None or c < best[0]:
                best = (c, n, box)
            if c == 0:
                break
        place(ann, best[1])
        obstacles.append(best[2])


def _draw_series(ax, series, labels: list[str], scale: float, y_higher_better: bool) -> list[tuple]:
    """Each report's points, Pareto-optimal ones filled and joined; returns the labels to place."""
    several = len(series) > 1
    labelled = []
    for i, pts in series:
        xy = [(x / scale, y) for x, y, _ in pts]
        front = pareto(xy, y_higher_better)
        others = [k for k in range(len(xy)) if k not in front]
        prefix = f"{labels[i]}: " if several else ""
        ax.plot([xy[k][0] for k in front], [xy[k][1] for k in front], "-", color=color(i), linewidth=1.5, alpha=0.6,
                zorder=2)
        ax.scatter([xy[k][0] for k in front], [xy[k][1] for k in front], s=70, color=color(i), zorder=3,
                   edgecolor="white", linewidth=1, label=prefix + "Pareto-optimal")
        if others:
            ax.scatter([xy[k][0] for k in others], [xy[k][1] for k in others], s=50, facecolor="white",
                       edgecolor=color(i) if several else "#718096", linewidth=1.5, zorder=3,
                       label=prefix + "dominated")
        for k in front + others:
            style = {"fontsize": 9, "fontweight": "bold" if k in front else "normal",
                     "color": "#1a202c" if k in front else "#4a5568"}
            labelled.append((xy[k][0], xy[k][1], pts[k][2], style))
    return labelled


def _log_when_wide(ax, xs: list[float], ys: list[float], y_metric: str) -> None:
    """Log axes where values span more than 30× (e.g. a small model's report beside a big one)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for values, axis, set_scale, fmt in ((ys, ax.yaxis, ax.set_yscale, rate),
                                         (xs, ax.xaxis, ax.set_xscale, lambda v: f"{v:,.3g}")):
        if min(values) > 0 and max(values) / min(values) > 30:
            set_scale("log")
            axis.set_major_formatter(FuncFormatter(lambda v, _, fmt=fmt: fmt(v)))
            axis.set_minor_formatter(NullFormatter())
    if y_metric == "tokens_per_s" and ax.get_yscale() == "linear":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: rate(v)))


def _scatter(charts: _Charts, groups: Groups, labels: list[str], y_metric: str, title: str, ylabel: str,
             aria: str, y_higher_better: bool) -> str | None:
    series = []
    for i, group in enumerate(groups):
        pts = [(METRICS["peak_memory"].get(r), METRICS[y_metric].get(r), r.strategy) for r in group]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if pts:
            series.append((i, pts))
    if not series:
        return None
    unit, scale = _memory_unit([p[0] for _, pts in series for p in pts])
    fig = charts.figure(9, 5.2)
    ax = fig.add_subplot()
    labelled = _draw_series(ax, series, labels, scale, y_higher_better)
    _log_when_wide(ax, [x / scale for _, pts in series for x, _, _ in pts], [p[1] for _, pts in series for p in pts],
                   y_metric)
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel(f"peak memory ({unit}; lower is better)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left")
    ax.text(0.01, 0.98 if y_higher_better else 0.02, "better ↖" if y_higher_better else "better ↙",
            transform=ax.transAxes, ha="left", va="top" if y_higher_better else "bottom", color="#718096")
    _place_labels(fig, ax, labelled)
    ax.legend(loc="best")
    return charts.svg(fig, aria)


def _quality_chart(charts: _Charts, groups: Groups, labels: list[str]) -> tuple[str, str, str] | None:
    groups = [[r for r in g if r.quality is not None and r.quality.status == "ok"] for g in groups]
    loss = any(METRICS["heldout_loss"].get(r) is not None for g in groups for r in g)
    metric = "heldout_loss" if loss else "accuracy"
    svg = _scatter(charts, groups, labels, metric, "Quality against memory",
                   "held-out loss after training (lower is better)" if loss
                   else "held-out accuracy after training (higher is better)",
                   "Held-out quality against peak memory", not loss)
    if svg is None:
        return None
    return ("Quality against memory", "Held-out " + ("loss" if loss else "accuracy")
            + " after the quality steps, against peak memory; filled points are Pareto-optimal.", svg)


def charts(reports: Sequence[Report], labels: list[str]) -> list[tuple[str, str, str]]:
    """(title, caption, inline SVG) for each chart the reports have data for."""
    groups = [r.ok_results() for r in reports]
    maker = _Charts()
    several = len(reports) > 1
    out = []
    with maker.matplotlib.rc_context(_RC):
        svg = _chart_tokens(maker, groups, labels)
        if svg:
            out.append(("Throughput", "Median training tokens per second of each strategy that ran"
                        + (", one group per report" if several else "")
                        + "; the error bar spans the tokens per second of its slowest to its fastest step.", svg))
        svg = _chart_memory(maker, groups, labels)
        if svg:
            out.append(("Peak memory", "Peak memory of a training step, split into what holds it; the number "
                        "is the measured peak; a black tick marks adapters plan's prediction.", svg))
        svg = _scatter(maker, groups, labels, "tokens_per_s", "Speed against memory", "tokens/s (higher is better)",
                       "Pareto chart of peak memory against tokens per second", True)
        if svg:
            out.append(("Speed against memory", "Filled points are Pareto-optimal: no other strategy"
                        + (" in the same report" if several else "")
                        + " uses less memory and is faster. The line joins them.", svg))
        quality = _quality_chart(maker, groups, labels)
        if quality:
            out.append(quality)
    return out
