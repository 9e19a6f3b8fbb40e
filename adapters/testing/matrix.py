"""The capability matrix: strategy x quantization x task, found by running the conformance checks.

Nothing here reads a declaration to decide a cell: a cell says ``yes`` only when the checks of
`adapters.testing` passed for that strategy, task and quantization on a tiny model, ``refused``
when the strategy does not declare it and `adapters train` refuses it up front, and ``fails: ...``
naming the failed checks otherwise. `adapters matrix` prints it as markdown or JSON; the README's
table is this module's markdown, between the markers below.

A strategy may say why: ``limits`` (what it refuses beyond what PEFT or its code declares: a task, a
quantization, ``gradient-checkpointing``, ``merge``) and ``known_failures`` (checks that fail although
it trains), each a dict from the name to a clause, are printed beside its options.
"""
from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..contract import QUANTIZATIONS, TASKS
from ..errors import AdaptersError
from .catalog import CHECKS
from .harness import TINY_MODEL
from .report import FAIL, PASS, CheckReport
from .runner import run_checks

START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"


def probe(strategies: Iterable[str] | None = None, progress: Callable[[str], None] | None = None,
          **kwargs: Any) -> list[CheckReport]:
    """Run the checks on every registered strategy (or those named), in name order."""
    from ..host import get_registry

    names = list(strategies) if strategies is not None else get_registry().names()
    reports = []
    for name in names:
        if progress:
            progress(name)
        reports.append(run_checks(name, **kwargs))
    return reports


def cell(report: CheckReport, task: str, quantization: str) -> tuple[str, list[str]]:
    """("yes" | "refused" | "fails" | "not refused", the failed checks) for one cell."""
    rows = [r for r in report.results if r.task == task and r.quantization == quantization]
    failed = sorted({r.check for r in rows if r.status == FAIL}, key=_check_order)
    global_failures = [r.check for r in report.results if r.task is None and r.status == FAIL]
    if global_failures:
        return "fails", global_failures
    declared = task in report.supported_tasks and quantization in report.supported_quantization
    if declared:
        if failed:
            return "fails", failed
        return ("yes", []) if any(r.status == PASS for r in rows) else ("unchecked", [])
    refused = [r for r in rows if r.check == "refused"]
    if refused and all(r.status == PASS for r in refused):
        return "refused", []
    return ("not refused", ["refused"]) if refused else ("unchecked", [])


def checkpointing(report: CheckReport, task: str) -> str:
    """Gradient checkpointing for one task: "yes", "refused", "fails", or "-" where the task is not supported."""
    rows = [r for r in report.results if r.check == "gradient-checkpointing" and r.task == task]
    if not rows:
        return "-"
    if any(r.status == FAIL for r in rows):
        return "fails"
    if all(r.status == PASS for r in rows):
        return "yes" if report.supports_gradient_checkpointing else "refused"
    return "unchecked"


def _check_order(name: str) -> int:
    return list(CHECKS).index(name) if name in CHECKS else len(CHECKS)


def _plugin_label(report: CheckReport) -> str:
    from ..host import DEFAULT_PLUGINS, distribution_of

    if report.plugin in DEFAULT_PLUGINS:
        return "built-in"
    distribution = distribution_of(report.plugin)[0]
    return report.plugin if distribution == "unknown" else distribution


def to_json(reports: list[CheckReport], model: str = TINY_MODEL) -> dict[str, Any]:
    """The matrix as JSON: one entry per strategy, with one cell per task and quantization."""
    from ..host import distribution_of

    strategies = []
    for report in reports:
        cells = []
        for task in TASKS:
            for quantization in QUANTIZATIONS:
                status, failed = cell(report, task, quantization)
                cells.append({"task": task, "quantization": quantization, "status": status, "failed_checks": failed})
        strategies.append({
            "name": report.strategy,
            "plugin": report.plugin,
            "distribution": distribution_of(report.plugin)[0],
            "description": report.description,
            "options": report.options,
            "gradient_checkpointing": {task: checkpointing(report, task) for task in TASKS},
            "cells": cells,
        })
    return {"model": model, "quantizations": list(QUANTIZATIONS), "tasks": list(TASKS), "strategies": strategies}


def _render(status: str, failed: list[str]) -> str:
    return f"fails: {', '.join(failed)}" if status == "fails" and failed else status


def to_markdown(reports: list[CheckReport], model: str = TINY_MODEL) -> str:
    """The matrix as a markdown table, a legend, and each strategy's description and default options."""
    third_party = any(_plugin_label(r) != "built-in" for r in reports)
    headers = ["strategy"] + (["plugin"] if third_party else []) + ["task", *QUANTIZATIONS, "gradient checkpointing"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for report in reports:
        for task in TASKS:
            row = [f"`{report.strategy}`"] + ([_plugin_label(report)] if third_party else []) + [task]
            row += [_render(*cell(report, task, q)) for q in QUANTIZATIONS]
            row.append(checkpointing(report, task))
            lines.append("| " + " | ".join(row) + " |")
    legend = (
        f"Probed by `adapters matrix` on `{model}` (causal-lm, and sequence-classification with two labels), "
        "not read from the declarations: **yes** means every check of `adapters check` passed there (apply, "
        "a training step, parameter counts, determinism, a save -> load round trip, and for one quantization "
        "per task gradient checkpointing, a run of `adapters train`, and a run interrupted and resumed exactly); "
        "**refused** means the strategy does "
        "not declare it and `adapters train` refuses it up front; **fails** names the checks that failed."
    )
    lines += ["", *textwrap.wrap(legend, 100, break_on_hyphens=False), ""]
    for report in reports:
        options = " ".join(f"{k}={_option(v)}" for k, v in report.options.items())
        item = f"- `{report.strategy}`: {report.description}" + (
            f"; options (defaults): `{options}`" if options else "; no options") + _reasons(report.strategy)
        lines += textwrap.wrap(item, 100, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines) + "\n"


def _reasons(name: str) -> str:
    """What the strategy refuses and which checks fail for it, with why (its ``limits`` and ``known_failures``)."""
    from ..host import get_registry

    entry = get_registry().find(name)
    strategy = entry.strategy if entry is not None else None
    said = [(f"refuses {what}", why) for what, why in getattr(strategy, "limits", {}).items()]
    said += [(f"fails {check}", why) for check, why in getattr(strategy, "known_failures", {}).items()]
    return "".join(f"; {what}: {why}" for what, why in said)


def _option(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def readme_block(text: str) -> str:
    """What lies between the matrix markers of a README's text."""
    match = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, re.S)
    if not match:
        raise AdaptersError(f"no {START} ... {END} block found. Add the two markers where the table goes.")
    return match.group(1)


def update_readme(path: str | Path, markdown: str) -> bool:
    """Replace the block between the markers in ``path`` with ``markdown``; True when it changed."""
    path = Path(path)
    text = path.read_text()
    old = readme_block(text)
    if old == markdown:
        return False
    start = text.index(START) + len(START) + 1
    path.write_text(text[:start] + markdown + text[start + len(old):])
    return True
