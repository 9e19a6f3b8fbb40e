"""Benchmark reports: the typed format, loading, comparing, and rendering as markdown, HTML or a plugin's format.

Modules, one job each:

* `model`: the report as msgspec structs; the shipped JSON Schema is generated from it.
* `load`: strict JSON, version checks and upgrades, typed errors as `AdaptersError`.
* `metrics`: the numbers compared between reports (`METRICS`).
* `compare`: verdicts against noise, ``--fail-on``, ``--reference``; returns data.
* `tables`, `markdown`, `html`, `charts`: what the rendered reports show (charts need matplotlib).
* `renderers`: markdown and HTML registered as report formats, through the hook a plugin's format
  uses (``register_report_renderers``).
* `commands`: what `adapters compare` and `adapters report` print and write.
* `output`: which existing file ``--output --overwrite`` may replace (only a report of ours).

The names below are imported on first use, so ``import adapters.reports`` is cheap and never loads
matplotlib or torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "model": ["SCHEMA_VERSION", "SCHEMA_DIR", "Report", "Provenance", "Settings", "OkResult", "NotRun", "Result",
              "json_schema", "schema", "write_schema"],
    "load": ["load_report", "read_report", "as_report"],
    "metrics": ["METRICS", "Metric"],
    "compare": ["Comparison", "Failure", "Relative", "Row", "compare_reports", "noise_band", "parse_fail_on",
                "relative_to"],
    "commands": ["DEFAULT_FORMAT", "format_comparison", "format_for", "format_relative", "run_compare", "write_report"],
    "markdown": ["render_markdown"],
    "html": ["render_html"],
    "output": ["check_output", "is_bench_report", "is_rendered_report"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "Comparison", "DEFAULT_FORMAT", "Failure", "METRICS", "Metric", "NotRun", "OkResult", "Provenance", "Relative",
    "Report", "Result", "Row", "SCHEMA_DIR", "SCHEMA_VERSION", "Settings", "as_report", "check_output",
    "compare_reports", "format_comparison", "format_for", "format_relative", "is_bench_report",
    "is_rendered_report", "json_schema", "load_report", "noise_band", "parse_fail_on", "read_report",
    "relative_to", "render_html", "render_markdown", "run_compare", "schema", "write_report", "write_schema",
]

if TYPE_CHECKING:
    from .commands import DEFAULT_FORMAT, format_comparison, format_for, format_relative, run_compare, write_report
    from .compare import Comparison, Failure, Relative, Row, compare_reports, noise_band, parse_fail_on, relative_to
    from .html import render_html
    from .load import as_report, load_report, read_report
    from .markdown import render_markdown
    from .metrics import METRICS, Metric
    from .model import (
        SCHEMA_DIR,
        SCHEMA_VERSION,
        NotRun,
        OkResult,
        Provenance,
        Report,
        Result,
        Settings,
        json_schema,
        schema,
        write_schema,
    )
    from .output import check_output, is_bench_report, is_rendered_report


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
