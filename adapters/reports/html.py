"""Benchmark reports as one self-contained HTML page.

The page shows the charts (`adapters.reports.charts`) as inline SVG; with exactly two reports, the
verdicts of `adapters compare` (the second against the first); then, per report, a results table
(every strategy, with the message of those that did not run) and a provenance table.

Reports are untrusted input: every piece of text from them is escaped. The page loads nothing from
anywhere and runs no script; its Content-Security-Policy forbids both.
"""
from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import AdaptersError
from .load import as_report
from .metrics import METRICS
from .model import Report
from .tables import NUMERIC_COLUMNS, description, heading, provenance_rows, results_table, run_labels, summary, text

# The start of every page's title, by which `is_html_report` knows one.
TITLE = "adapters benchmark report"

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
td.status-ok, td.better { color: #276749; font-weight: 600; }
td.status-bad, td.worse { color: #9c4221; font-weight: 600; }
td.noise, td.n-a { color: #4a5568; }
table.provenance th { width: 10em; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.95em;
       word-break: break-all; }
.summary { color: #4a5568; }
ul.reports { padding-left: 1.2em; }
"""


def _e(value: Any) -> str:
    return html.escape(text(value), quote=True)


def _cell(value: str, cls: str = "") -> str:
    return f'<td class="{cls}">{_e(value)}</td>' if cls else f"<td>{_e(value)}</td>"


def _results_table(headers: list[str], rows: list[list[str]], bad: list[bool]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row, not_ok in zip(rows, bad):
        cells = []
        for j, cell in enumerate(row):
            if j in NUMERIC_COLUMNS:
                cls = "num"
            elif j == 1:
                cls = "status-bad" if not_ok else "status-ok"
            else:
                cls = {0: "nowrap"}.get(j) or {"held-out quality": "nowrap", "memory components": "comp"}.get(
                    headers[j], "")
            cells.append(_cell(cell, cls))
        body.append(f'<tr class="{"not-ok" if not_ok else "ok"}">' + "".join(cells) + "</tr>")
    return f"<table class=\"results\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _comparison(reports: list[Report], labels: list[str]) -> list[str]:
    """The verdicts of the second report against the first, as `adapters compare` gives them."""
    from .compare import compare_reports, noise_rule

    title = f"<h2 id=\"comparison\">Comparison: {_e(labels[1])} against {_e(labels[0])}</h2>"
    try:
        comparison = compare_reports(reports[0], reports[1])
    except AdaptersError as exc:
        return [title, f"<p><em>Not compared: {_e(str(exc))}</em></p>"]
    parts = [title]
    parts += [f"<p class=\"summary\">warning: {_e(w)}</p>" for w in comparison.warnings]
    head = "".join(f"<th>{_e(h)}</th>" for h in ("strategy", "metric", labels[0], labels[1], "new/base", "verdict",
                                                  "direction"))
    body = []
    for r in comparison.rows:
        metric = METRICS[r.metric]
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        cells = [_cell(r.strategy, "nowrap"), _cell(r.label), _cell(metric.format(r.base), "num"),
                 _cell(metric.format(r.new), "num"), _cell(ratio, "num"),
                 _cell(f"{r.mark} {r.verdict}", r.verdict.replace("/", "-")), _cell(r.direction)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    parts.append(f"<table class=\"comparison\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    leftovers = [f"only in {labels[0]}: {', '.join(comparison.only_in_base)}"] * bool(comparison.only_in_base)
    leftovers += [f"only in {labels[1]}: {', '.join(comparison.only_in_new)}"] * bool(comparison.only_in_new)
    leftovers += [f"not compared: {i['strategy']} ({i['base']}, then {i['new']})" for i in comparison.not_compared]
    leftovers.append(noise_rule())
    parts += [f"<p class=\"summary\">{_e(line)}</p>" for line in leftovers]
    return parts


def _report_section(i: int, report: Report, label: str, source: str | None) -> list[str]:
    parts = [f'<h2 id="report-{i + 1}">{_e(heading(report, label, source))}</h2>'
             f'<p class="summary">{_e(summary(report))}</p>', "<h3>Results</h3>"]
    headers, rows = results_table(report)
    if rows:
        parts.append(_results_table(headers, rows, [not r.ok for r in report.results]))
    else:
        parts.append("<p><em>No results.</em></p>")
    parts.append('<h3>Provenance</h3><table class="provenance"><tbody>')
    for key, value in provenance_rows(report, source):
        cell = f"<code>{_e(value)}</code>" if key in ("command", "commit") else _e(value)
        parts.append(f"<tr><th>{_e(key)}</th><td>{cell}</td></tr>")
    parts.append("</tbody></table>")
    return parts


def _head(title: str) -> list[str]:
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing is fetched and no script runs, even if something slipped through escaping.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
    ]


def render_html(reports: Sequence[Report | Mapping[str, Any]], *, sources: Sequence[str] | None = None,
                labels: Sequence[str] | None = None, preface: Sequence[str] = ()) -> str:
    """One self-contained HTML page: charts as inline SVG, the comparison of two reports, then each report.
    ``preface``: HTML put first, before the list of reports (`adapters recommend` puts its recommendation there)."""
    from .charts import charts, color

    if not reports:
        raise AdaptersError("no reports to render. Give at least one report written by `adapters bench`.")
    typed = [as_report(r, sources[i] if sources else f"report {i + 1}") for i, r in enumerate(reports)]
    names = run_labels(typed, sources, labels)
    title = TITLE + (f": {description(typed[0])}" if len(typed) == 1
                                           else f" ({len(typed)} reports)")
    parts = _head(title) + list(preface) + ['<ul class="reports">']
    for i, (report, label) in enumerate(zip(typed, names)):
        source = sources[i] if sources else None
        shade = color(i) if len(typed) > 1 else "#1a202c"
        parts.append(f'<li><a href="#report-{i + 1}" style="color:{shade}">{_e(heading(report, label, source))}'
                     f'</a>: <span class="summary">{_e(summary(report))}</span></li>')
    parts.append("</ul>")
    figures = charts(typed, names)
    for name, caption, svg in figures:
        parts.append(f"<figure>{svg}<figcaption><b>{_e(name)}.</b> {_e(caption)}</figcaption></figure>")
    if not figures:
        parts.append("<p><em>No strategy ran successfully, so there is nothing to chart.</em></p>")
    if len(typed) == 2:
        parts += _comparison(typed, names)
    for i, (report, label) in enumerate(zip(typed, names)):
        parts += _report_section(i, report, label, sources[i] if sources else None)
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def is_html_report(start: str) -> bool:
    """Whether a file that begins with ``start`` is a page `render_html` wrote: its title."""
    return start.startswith("<!DOCTYPE html>") and f"<title>{TITLE}" in start
