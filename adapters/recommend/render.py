"""What `adapters recommend` shows and keeps: the ranked table, the Pareto chart, the HTML report and its files."""
from __future__ import annotations

import html
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..files import write_atomic, write_json
from ..text import aligned_table, format_bytes

FILES = {"bench": "bench.json", "result": "recommend.json", "html": "report.html"}


def merged(reports: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """One bench report of the runs in ``reports`` (each a report of one strategy, with the same settings)."""
    if not reports:
        return None
    first = reports[0]
    settings = {**first["settings"], "strategies": [r["results"][0]["strategy"] for r in reports], "output": None}
    return {**first, "settings": settings, "results": [r["results"][0] for r in reports],
            "interrupted": any(r.get("interrupted") for r in reports)}


def table(result: dict[str, Any]) -> str:
    """The candidates, ranked, as an aligned text table."""
    rows = []
    for i, c in enumerate(result["candidates"], 1):
        measured = c["tokens_per_s"] is not None
        rows.append([str(i) if measured else "-", c["name"] + (" *" if c["status"] == "recommended" else ""),
                     c["status"], format_bytes(c["planned_peak_bytes"]), format_bytes(c["peak_bytes"]),
                     f"{c['tokens_per_s']:,.0f}" if measured else "-",
                     f"{c['loss_after']:.4f}" if c["loss_after"] is not None else "-",
                     "yes" if c["on_front"] else ("no" if measured else "-")])
    headers = ["#", "candidate", "status", "plan peak", "peak", "tokens/s", "loss after", "front"]
    return aligned_table(rows, headers)


def text(result: dict[str, Any]) -> str:
    """What the command prints: the table, the recommendation and why, why each other candidate lost."""
    tokens = result["learning_tokens"]
    lines = [f"{result['model']}, {result['batch_size']} x {result['seq_len']}, memory limit "
             f"{format_bytes(result['memory_limit_bytes'])} ({result['memory_limit_source']}); held-out loss after "
             f"{result['learning_steps']} steps ({tokens:,} tokens)" if tokens else
             f"{result['model']}: no candidate measured", "", table(result), ""]
    if result["recommended"]:
        lines.append(f"Recommended: {result['recommended']}. {result['why']}")
    else:
        lines.append(f"No recommendation: {result['why']}")
    for c in result["candidates"]:
        if c["status"] != "recommended":
            lines.append(f"- {c['name']} ({c['status']}): {c['reason']}")
    lines.append(f"({result['noise_rule']})")
    lines.append(f"Took {result['seconds']:.0f} s of the {60 * result['budget_minutes']:.0f} s budget.")
    return "\n".join(lines)


def train_command(result: dict[str, Any]) -> str | None:
    """The `adapters train` command for the recommended candidate, as it was measured."""
    c = next((c for c in result["candidates"] if c["status"] == "recommended"), None)
    if c is None:
        return None
    parts = ["adapters train", f"--model {result['model']}", f"--strategy {c['name']}"]
    if result["data"]:
        parts.append(f"--data {result['data']}")
    parts += [f"--batch-size {c['batch_size']}", f"--seq-len {result['seq_len']}"]
    if c["gradient_accumulation_steps"] and c["gradient_accumulation_steps"] > 1:
        parts.append(f"--gradient-accumulation-steps {c['gradient_accumulation_steps']}")
    if c.get("checkpoint_layers"):
        parts.append(f"--checkpoint-layers {c['checkpoint_layers']}")
    elif c["gradient_checkpointing"]:
        parts.append("--gradient-checkpointing")
    if c["offload_activations"]:
        parts.append("--offload-activations")
    return " ".join(parts)


def chart(result: dict[str, Any], fmt: str = "svg") -> str | bytes | None:
    """Held-out loss against tokens/s and against peak memory, the Pareto front filled and the recommendation
    starred: inline SVG (``fmt="svg"``) or PNG bytes (``"png"``); None when nothing was measured."""
    from ..reports.charts import _Charts, _memory_unit, _place_labels

    shown = [c for c in result["candidates"] if c["tokens_per_s"] is not None]
    if not shown:
        return None
    maker = _Charts()
    fig = maker.figure(10, 4.6)
    axes = fig.subplots(1, 2, sharey=True)
    unit, scale = _memory_unit([c["peak_bytes"] for c in shown])
    panels = ((axes[0], "tokens_per_s", 1, "tokens/s (higher is better)", "better ↙ and →"),
              (axes[1], "peak_bytes", scale, f"peak memory ({unit}; lower is better)", "better ↙"))
    for ax, key, div, label, hint in panels:
        labelled = []
        for c in shown:
            x, y = c[key] / div, c["loss_after"]
            if c["status"] == "recommended":
                ax.scatter([x], [y], s=220, marker="*", color="#2f855a", zorder=4, edgecolor="white")
            elif c["on_front"]:
                ax.scatter([x], [y], s=70, color="#2b6cb0", zorder=3, edgecolor="white")
            else:
                ax.scatter([x], [y], s=50, facecolor="white", edgecolor="#718096", linewidth=1.5, zorder=3)
            style = {"fontsize": 9, "fontweight": "bold" if c["on_front"] else "normal",
                     "color": "#1a202c" if c["on_front"] else "#4a5568"}
            labelled.append((x, y, c["name"], style))
        ax.margins(x=0.2, y=0.15)
        ax.set_xlabel(label)
        ax.text(0.99 if key == "tokens_per_s" else 0.01, 0.02, hint, transform=ax.transAxes,
                ha="right" if key == "tokens_per_s" else "left", va="bottom", color="#718096")
        _place_labels(fig, ax, labelled)
    axes[0].set_ylabel(f"held-out loss after {result['learning_tokens']:,} tokens (lower is better)")
    fig.suptitle(f"Recommend: {result['recommended'] or 'nothing measured'} (star); filled: the Pareto front",
                 x=0.01, ha="left", fontsize=12, fontweight="bold")
    if fmt == "png":
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
        return buf.getvalue()
    return maker.svg(fig, "Held-out loss against tokens/s and peak memory, per candidate")


def page(result: dict[str, Any], reports: list[dict[str, Any]], labels: list[str]) -> str:
    """The HTML report: the recommendation, its chart and ranked table, then the bench reports behind it."""
    from ..reports.html import render_html

    e = html.escape
    preface = ["<section><h2>Recommendation</h2>",
               f"<p><b>{e(result['recommended'] or 'none')}</b>: {e(result['why'])}</p>"]
    svg = chart(result)
    if svg:
        preface.append(f"<figure>{svg}<figcaption><b>The Pareto front.</b> Held-out loss after the same tokens "
                       "against speed and memory; the recommendation starred.</figcaption></figure>")
    preface.append(f"<pre>{e(table(result))}</pre><ul>")
    preface += [f"<li><b>{e(c['name'])}</b> ({e(c['status'])}): {e(c['reason'] or '')}</li>"
                for c in result["candidates"] if c["status"] != "recommended"]
    command = train_command(result)
    preface.append("</ul>" + (f"<p>Train it: <code>{e(command)}</code></p>" if command else "")
                   + f"<p><small>{e(result['noise_rule'])}</small></p></section>")
    if not reports:
        return "<!doctype html><html><body>" + "\n".join(preface) + "</body></html>\n"
    return render_html(reports, labels=labels, preface=preface)


def write_outputs(output: Path, result: dict[str, Any], reports: list[dict],
                  finish: Callable[[], None] = lambda: None) -> None:
    """The output directory: the bench report of every run, the HTML report and the recommendation as JSON, each
    file written whole (temp + rename); ``finish`` completes ``result`` (its seconds) just before it is written."""
    output.mkdir(parents=True, exist_ok=True)
    report = merged(reports)
    if report is not None:
        report["settings"]["output"] = str(output / FILES["bench"])
        write_json(output / FILES["bench"], report)
    result["files"] = {k: str(output / v) for k, v in FILES.items() if k != "bench" or report is not None}
    shown = page(result, [report] if report else [], ["candidates"])
    finish()
    write_atomic(output / FILES["html"], shown)
    write_json(output / FILES["result"], result)
