"""Benchmark reports as GitHub-flavoured markdown: per report, a results table and a provenance table."""
from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import AdaptersError
from .load import as_report
from .model import Report
from .tables import NUMERIC_COLUMNS, heading, provenance_rows, results_table, run_labels, summary

# The first line of every rendering, by which `is_markdown_report` knows one.
TITLE = "# adapters benchmark report"


def _md(text: str) -> str:
    """A table cell: HTML-escaped (GitHub renders inline HTML), pipes escaped, one line."""
    text = html.escape(text, quote=False).replace("|", "\\|")
    return " ".join(text.split()) or " "


def _md_table(headers: list[str], rows: list[list[str]], right: set[int] | frozenset[int] = frozenset()) -> str:
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(_md(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(reports: Sequence[Report | Mapping[str, Any]], *, sources: Sequence[str] | None = None,
                    labels: Sequence[str] | None = None) -> str:
    """The reports' results and provenance as GitHub-flavoured markdown tables."""
    if not reports:
        raise AdaptersError("no reports to render. Give at least one report written by `adapters bench`.")
    typed = [as_report(r, sources[i] if sources else f"report {i + 1}") for i, r in enumerate(reports)]
    names = run_labels(typed, sources, labels)
    out = [TITLE, ""]
    for i, (report, label) in enumerate(zip(typed, names)):
        source = sources[i] if sources else None
        out += [f"## {_md(heading(report, label, source))}", "", _md(summary(report)), ""]
        headers, rows = results_table(report)
        out += [_md_table(headers, rows, right=NUMERIC_COLUMNS) if rows else "_No results._", ""]
        provenance = _md_table(["field", "value"], [[k, v] for k, v in provenance_rows(report, source)])
        out += ["<details><summary>Provenance</summary>", "", provenance, "", "</details>", ""]
    return "\n".join(out)


def is_markdown_report(start: str) -> bool:
    """Whether a file that begins with ``start`` is one `render_markdown` wrote."""
    return start.startswith(TITLE + "\n")
