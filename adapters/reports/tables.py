"""What the markdown and HTML reports show, as text not yet escaped: labels, summaries, table rows.

Each renderer escapes this text for its own format; text from a report is never trusted.
"""
from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from ..errors import AdaptersError
from ..text import DASH, format_bytes
from .model import OkResult, Report

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
NUMERIC_COLUMNS = frozenset({2, 3, 4, 5})  # trainable params, step time, tokens/s, peak memory


def text(value: Any) -> str:
    """A value as table text: a dash for None, yes/no for booleans."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


# --------------------------------------------------------------------------------------------
# Labels


def description(report: Report) -> str:
    """A short description of a report: its model and the machine it ran on."""
    gpu = report.provenance.gpu
    return f"{report.settings.model} on {gpu.name if gpu else report.settings.device}"


def run_labels(reports: Sequence[Report], sources: Sequence[str] | None = None,
               labels: Sequence[str] | None = None) -> list[str]:
    """What charts and headings call each report: ``labels``, else the file names, else model and machine
    (numbered where those repeat; never the timestamp, which says nothing about the run)."""
    if labels:
        if len(labels) != len(reports) or len(set(labels)) < len(labels) or not all(s.strip() for s in labels):
            raise AdaptersError(f"--label given {len(labels)} time(s) for {len(reports)} report(s). "
                                "Give one distinct, non-empty --label per report, in the order of the reports.")
        return list(labels)
    if sources and len(set(sources)) == len(sources):
        return list(sources)
    names = [description(r) for r in reports]
    if len(set(names)) < len(names):  # same model and machine: tell them apart by their order
        names = [f"report {i + 1}: {name}" for i, name in enumerate(names)]
    return names


def heading(report: Report, label: str, source: str | None) -> str:
    """A report's heading: its label, with the file and the model and machine where the label does not say them."""
    out = label + (f" ({source})" if source and source != label else "")
    about = description(report)
    return out if about in label else f"{out}: {about}"


def summary(report: Report) -> str:
    s = report.settings
    parts = [f"model {s.model}", f"device {s.device}", f"dtype {s.dtype}", f"batch {s.batch_size} × seq {s.seq_len}",
             f"{s.steps} timed steps × {s.repeats} repeats after {s.warmup} warm-up",
             f"gradient checkpointing {text(s.gradient_checkpointing)}"
             + (f" (the first {s.checkpoint_layers} layers)" if s.checkpoint_layers else "")]
    if s.quality_steps:
        parts.append(f"quality over {s.quality_steps} steps")
    if s.processes > 1:
        parts.append(f"{s.processes} processes ({'FSDP' if s.sharding == 'fsdp' else 'data parallel'}; batch and "
                     "peak per process, tokens/s of all)")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Cells of the results table


def rate(v: float | None) -> str:
    if v is None:
        return DASH
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _seconds(v: float) -> str:
    return f"{v * 1000:,.1f} ms" if v < 1 else f"{v:,.2f} s"


def _step_time(result: OkResult) -> str:
    # spread is (max - min) / median, so ± half of it brackets the repeats around the median
    return _seconds(result.step_s.median) + f" ±{100 * result.step_s.spread / 2:.0f}%"


def _trainable(result: OkResult) -> str:
    return f"{result.trainable_parameters:,} ({100 * result.trainable_parameters / result.total_parameters:.3g}%)"


def _components(result: OkResult) -> str:
    comps = result.memory.components
    values = [(key, getattr(comps, key)) for key, _, _ in COMPONENTS]
    values = [(key, v) for key, v in values if v]
    if not values:
        return DASH
    top = result.memory.peak_bytes or max(abs(v) for _, v in values)
    unit, scale = next(((u, s) for u, s in (("GiB", 2.0**30), ("MiB", 2.0**20)) if top >= s), ("KiB", 2.0**10))
    return " · ".join(f"{_SHORT[key]} {v / scale:,.2f}" for key, v in values) + f" {unit}"


def _quality(result: OkResult) -> str:
    quality = result.quality
    if quality is None:
        return DASH
    if quality.status != "ok":
        return quality.status
    before, after = quality.before or {}, quality.after or {}
    parts = []
    for key in ("loss", "accuracy"):
        b, a = before.get(key), after.get(key)
        if a is not None:
            parts.append(f"{key} {b:.4g} → {a:.4g}" if b is not None else f"{key} {a:.4g}")
    return ", ".join(parts) or DASH


def _prediction(result: OkResult) -> str:
    prediction = result.prediction
    if prediction is None:
        return DASH
    if prediction.status != "ok":
        return prediction.status
    error = (prediction.error_pct or {}).get("total")
    return format_bytes(prediction.peak_bytes, missing=DASH) + (f" ({error:+.1f}%)" if error is not None else "")


def _scaling(result: OkResult) -> str:
    scaling = result.scaling
    if scaling is None:
        return DASH
    return f"{scaling.efficiency:.2f} (1 process: {rate(scaling.single_process_tokens_per_s)} tokens/s)"


def _peak(result: OkResult) -> str:
    peak = format_bytes(result.memory.peak_bytes, missing=DASH)
    each = result.memory.per_process_peak_bytes
    return peak if not each or len(each) < 2 else f"{peak} (each: {', '.join(format_bytes(b) for b in each)})"


def results_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a report's results table, one row per result, in the report's order."""
    ok = report.ok_results()
    scaled = any(r.scaling is not None for r in ok)
    mfu = any(r.mfu is not None for r in ok)
    energy = any(r.energy_j_per_token is not None for r in ok)
    quality = any(r.quality is not None for r in ok)
    planned = any(r.prediction is not None for r in ok)
    headers = ["strategy", "status", "trainable params", "step time (median ±½ spread)", "tokens/s",
               "peak memory"] + ["plan's prediction (error)"] * planned + ["memory components"]
    headers += ["scaling efficiency"] * scaled
    headers += ["MFU"] * mfu + ["energy/token"] * energy + ["held-out quality"] * quality + ["flags / message"]
    rows = []
    for r in report.results:
        if not isinstance(r, OkResult):
            rows.append([r.strategy, r.status] + [""] * (len(headers) - 3) + [r.message or ""])
            continue
        cells = [r.strategy, "ok", _trainable(r), _step_time(r), rate(r.tokens_per_s), _peak(r)]
        cells += [_prediction(r)] * planned + [_components(r)] + [_scaling(r)] * scaled
        if mfu:
            cells.append(DASH if r.mfu is None else f"{100 * r.mfu:.1f}%")
        if energy:
            cells.append(DASH if r.energy_j_per_token is None else f"{r.energy_j_per_token:.3g} J")
        if quality:
            cells.append(_quality(r))
        cells.append("; ".join(r.flags))
        rows.append(cells)
    return headers, rows


# --------------------------------------------------------------------------------------------
# Provenance


def _pairs(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{k} {text(v)}" for k, v in mapping.items())


def _settings_text(report: Report) -> str:
    settings = report.settings
    values = [(name, getattr(settings, name)) for name in settings.__struct_fields__]
    return ", ".join(f"{k}={','.join(map(text, v)) if isinstance(v, list) else text(v)}" for k, v in values)


def provenance_rows(report: Report, source: str | None = None) -> list[tuple[str, str]]:
    prov = report.provenance
    commit = text(prov.commit) + (" (dirty: uncommitted changes)" if prov.dirty else "")
    gpu = prov.gpu
    gpu_text = "none" if gpu is None else f"{gpu.count} × {gpu.name}" + (
        f", {format_bytes(gpu.memory_bytes)}" if gpu.memory_bytes else "")
    rows = [("source", source)] if source else []
    rows += [
        ("created", report.created),
        ("schema version", str(report.schema_version)),
        ("commit", commit),
        ("command", shlex.join(prov.command)),
        ("seed", str(prov.seed)),
        ("python", prov.python),
        ("OS", prov.os),
        ("CPU", f"{prov.cpu.model}, {text(prov.cpu.cores)} cores"),
        ("GPU", gpu_text),
        ("versions", _pairs(prov.versions)),
        ("plugins", _pairs(prov.plugins)),
        ("settings", _settings_text(report)),
    ]
    return rows
