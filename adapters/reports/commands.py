"""What `adapters compare` and `adapters report` do: load reports, compare or render them, print or write."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import AdaptersError
from ..files import dumps_json, write_atomic
from ..host import Format, get_renderers, guarded
from ..text import aligned_table
from .compare import Comparison, Failure, Relative, compare_reports, noise_rule, parse_fail_on, relative_to
from .load import load_report
from .metrics import METRICS
from .tables import run_labels

# What `adapters report` prints without --format or --output.
DEFAULT_FORMAT = "markdown"


# --------------------------------------------------------------------------------------------
# adapters compare


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
        metric = METRICS[r.metric]
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        rows.append([r.strategy, r.label, metric.format(r.base), metric.format(r.new), ratio,
                     f"{r.mark} {r.verdict}", r.direction])
    lines.append(aligned_table(rows, ["strategy", "metric", "base", "new", "new/base", "verdict", "direction"]))
    if comparison.only_in_base:
        lines.append(f"only in base: {', '.join(comparison.only_in_base)}")
    if comparison.only_in_new:
        lines.append(f"only in new: {', '.join(comparison.only_in_new)}")
    for item in comparison.not_compared:
        lines.append(f"not compared: {item['strategy']} (base {item['base']}, new {item['new']})")
    lines.append(noise_rule())
    for f in failures or []:
        lines.append(f"FAIL {f.message}")
    return "\n".join(lines)


def format_relative(relatives: list[Relative], skipped: list[dict[str, Any]]) -> str:
    lines = [r.sentence for r in relatives]
    lines += [f"{s['strategy']}: not compared ({s['status']}{': ' + s['message'] if s.get('message') else ''})"
              for s in skipped]
    return "\n".join(lines) if lines else "no other ok strategy to compare"


def _json(data: Any) -> str:
    return dumps_json(data).rstrip("\n")  # the command prints it with its own newline


def _run_reference(path: str, reference: str, as_json: bool) -> tuple[str, int]:
    relatives, skipped = relative_to(load_report(path), reference)
    if as_json:
        return _json({"reference": reference, "strategies": [{**asdict(r), "sentence": r.sentence} for r in relatives],
                      "not_compared": skipped}), 0
    return format_relative(relatives, skipped), 0


def run_compare(paths: Sequence[str], reference: str | None = None, fail_on: Sequence[str] = (),
                as_json: bool = False, allow_different_processes: bool = False) -> tuple[str, int]:
    """What `adapters compare` prints, and its exit code (1 when a --fail-on threshold is exceeded)."""
    paths = list(paths)
    if reference is not None:
        if len(paths) != 1:
            raise AdaptersError(f"--reference compares strategies within one report; give exactly one report "
                                f"(got {len(paths)}), or drop --reference to compare BASE.json NEW.json.")
        if fail_on:
            raise AdaptersError("--fail-on needs two reports (BASE.json NEW.json); it does not apply to --reference.")
        return _run_reference(paths[0], reference, as_json)
    if len(paths) != 2:
        raise AdaptersError(f"give two reports, BASE.json NEW.json (got {len(paths)}), "
                            "or one report with --reference STRATEGY.")
    thresholds = parse_fail_on(list(fail_on))
    comparison = compare_reports(load_report(paths[0]), load_report(paths[1]),
                                 allow_different_processes=allow_different_processes, names=(paths[0], paths[1]))
    failures = comparison.failures(thresholds)
    checked = {r.metric for r in comparison.rows if r.verdict != "n/a"}
    for metric, pct in thresholds:
        if metric.name not in checked:
            comparison.warnings.append(f"--fail-on {metric.name}:{pct:g}% checked nothing: "
                                       f"no common strategy has {metric.label} in both reports")
    code = 1 if failures else 0
    if as_json:
        return _json({**comparison.to_dict(), "failures": [asdict(f) for f in failures]}), code
    return format_comparison(comparison, paths[0], paths[1], failures), code


# --------------------------------------------------------------------------------------------
# adapters report


def format_for(output: str | os.PathLike[str] | None, format: str | None) -> str:
    """The name of the report format to render: ``format`` (a name or alias of a registered format) when
    given, else the one whose suffix ``output`` has, else markdown."""
    return _renderer(output, format).name


def _renderer(output: str | os.PathLike[str] | None, format: str | None) -> Format:
    renderers = get_renderers()
    if format is not None:
        found = renderers.find(format)
        if found is None:
            raise AdaptersError(f"--format {format}: unknown. Use one of {', '.join(renderers.names())} "
                                "(`adapters plugins` lists the plugins that add them).")
        return found
    if output is None:
        return renderers.find(DEFAULT_FORMAT)
    found = renderers.for_path(str(output))
    if found is None:
        suffix = Path(output).suffix.lower()
        raise AdaptersError(
            f"--output {output}: cannot tell the format from the suffix {suffix or '(none)'!r}. "
            f"Name it {', '.join(renderers.suffixes())}, or pass --format {'|'.join(renderers.names())}."
        )
    return found


def _check_output(output: Path, overwrite: bool) -> None:
    from .output import check_output, is_rendered_report

    check_output(output, overwrite, is_rendered_report, "a report written by `adapters report`")


def write_report(paths: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str] | None = None,
                 format: str | None = None, *, overwrite: bool = False, labels: Sequence[str] | None = None) -> str:
    """Load the reports at ``paths``, render them, and write ``output`` atomically; returns the text.

    The format is ``format`` (any registered report format: markdown, html, or one a plugin adds), else
    the one ``output``'s suffix names, else markdown. Without ``output`` nothing is written (the CLI
    prints the text). An existing ``output`` is refused unless ``overwrite``, and even then unless a
    registered format recognises it as one of its renderings (`adapters.reports.output`). Runs are
    labelled by ``labels`` (one per report), else by their file names.
    """
    renderer = _renderer(output, format)
    if not paths:
        raise AdaptersError("no reports given. Pass one or more report files written by `adapters bench`.")
    out = Path(output) if output is not None else None
    if out is not None:
        _check_output(out, overwrite)
    reports = [load_report(p) for p in paths]
    sources = [str(p) for p in paths]
    if len({Path(s).name for s in sources}) == len(sources):
        sources = [Path(s).name for s in sources]
    names = run_labels(reports, sources, labels or None)
    text = guarded(renderer.plugin, lambda: renderer.function(reports, sources=sources, labels=names),
                   lambda error: AdaptersError(f"--format {renderer.name}: the renderer of plugin "
                                               f"{renderer.plugin!r} failed: {error}. Choose another --format, "
                                               "or fix or uninstall the plugin."))
    if not isinstance(text, str):
        raise AdaptersError(f"--format {renderer.name}: the renderer of plugin {renderer.plugin!r} returned "
                            f"{type(text).__name__}, not text. Choose another --format, or fix the plugin.")
    if out is None:
        return text
    _check_output(out, overwrite)  # again: rendering takes a moment and someone may have written it
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, text)
    return text
