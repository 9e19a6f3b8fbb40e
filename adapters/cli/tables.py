"""The command line's tables: what train, bench and plan print. The library returns data."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..text import GiB, MiB, aligned_table, format_bytes

if TYPE_CHECKING:
    from ..training import TrainResult

SUMMARY_HEADERS = ["strategy", "status", "trainable", "step ms", "tokens/s", "peak MiB", "plan MiB (error)",
                   "base / train+grad+opt / act MiB", "notes"]


def summary_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the summary table of a report: one row a strategy, failures with their reason.

    With several processes, the peak is the largest process's, tokens/s all processes', and a column gives the
    scaling efficiency against one process with that one's tokens/s."""
    processes = report["settings"].get("processes", 1)
    headers = list(SUMMARY_HEADERS)
    if processes > 1:
        headers[4], headers[5] = f"tokens/s ({processes} proc)", "peak MiB/proc"
        headers.insert(7, "scaling (1 proc tokens/s)")
    rows = []
    for r in report["results"]:
        if r["status"] != "ok":
            rows.append([r["strategy"], r["status"], *[""] * (len(headers) - 3), r.get("message") or ""])
            continue
        mem = r["memory"]
        comp = mem["components"]
        row = [
            r["strategy"], "ok", f"{r['trainable_parameters']:,}",
            f"{r['step_s']['median'] * 1000:,.0f} ±{100 * r['step_s']['spread'] / 2:.0f}%",
            f"{r['tokens_per_s']:,.0f}", f"{mem['peak_bytes'] / MiB:,.0f}", _predicted(r.get("prediction")),
            f"{(comp['base_weights_quantized'] + comp['base_weights_unquantized']) / MiB:,.0f} / "
            f"{(comp['trainable_parameters'] + comp['gradients'] + comp['optimizer_state']) / MiB:,.0f} / "
            f"{comp['activations_and_temporaries'] / MiB:,.0f}",
            "; ".join(r.get("flags") or []),
        ]
        if processes > 1:
            scaling = r.get("scaling")
            row.insert(7, "-" if not scaling else
                       f"{scaling['efficiency']:.2f} ({scaling['single_process_tokens_per_s']:,.0f})")
        rows.append(row)
    return headers, rows


def _predicted(prediction: dict[str, Any] | None) -> str:
    if not prediction:
        return "-"
    if prediction["status"] != "ok":
        return prediction["status"]
    return f"{prediction['peak_bytes'] / MiB:,.0f} ({prediction['error_pct']['total']:+.1f}%)"


def capacity_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a capacity search's table."""
    rows = []
    for c in report.get("capacity", []):
        tried = ", ".join(f"{t['value']}{'' if t['status'] == 'ok' else ' ' + t['status']}" for t in c["tries"])
        rows.append([c["strategy"], "none" if c["largest"] is None else f"{c['largest']:,}",
                     f"{c['peak_bytes'] / MiB:,.0f}" if c.get("peak_bytes") else "-",
                     "-" if c["predicted_largest"] is None else f"{c['predicted_largest']:,}", tried])
    param = report["settings"].get("find_max") or "value"
    return ["strategy", f"largest {param}", "its peak MiB", "plan predicts", "tries"], rows


def format_table(report: dict[str, Any]) -> str:
    """The report's results (and capacity searches) as aligned plain-text tables."""
    headers, rows = summary_rows(report)
    text = aligned_table(rows, headers)
    if report.get("capacity"):
        headers, rows = capacity_rows(report)
        text += "\n\n" + aligned_table(rows, headers)
    return text


def print_summary(report: dict[str, Any]) -> None:
    """The report's tables on stdout, drawn with rich when it is installed, else as plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_table(report))
        return
    headers, rows = summary_rows(report)
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: do not squeeze the table into 80 columns
        console = Console(width=200)
    table = Table(title=f"{report['settings']['model']} on {report['settings']['device']}")
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if 2 <= i <= 6 else "left", no_wrap=i < 8)
    for row in rows:
        ok = row[1] == "ok"
        table.add_row(*(row if ok else row[:-1] + [""]), style=None if ok else "yellow")
    console.print(table)
    for row in rows:
        if row[1] != "ok":
            console.print(f"[yellow]{row[0]}: {row[1]}[/]: {row[-1]}", highlight=False)
    if report.get("capacity"):
        headers, rows = capacity_rows(report)
        limit = report["capacity"][0]["limit_bytes"]
        table = Table(title=f"capacity search{'' if limit is None else f' under {format_bytes(limit)}'}")
        for header in headers:
            table.add_column(header)
        for row in rows:
            table.add_row(*row)
        console.print(table)


def plan_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the plan table; with several processes, one process's, with its communication buffers."""
    budget = result["budget_bytes"]
    several = result.get("processes", 1) > 1
    headers = ["strategy", "peak", "weights", "train+grad+opt", "activations", "logits+loss",
               *(["communication"] if several else []), "peak at"]
    if budget is not None:
        headers += ["verdict", "max batch", "max seq"]
    headers.append("notes")
    rows = []
    for p in result["plans"]:
        if p["status"] != "ok":
            rows.append([p["strategy"], p["status"]] + [""] * (len(headers) - 3) + [p["message"] or ""])
            continue
        c = p["components"]
        row = [p["strategy"], plan_size(p["peak_bytes"]),
               plan_size(c["base_weights_quantized"] + c["base_weights_unquantized"]),
               plan_size(c["trainable_parameters"] + c["gradients"] + c["optimizer_state"] + c["optimizer_step"]),
               plan_size(c["activations"]), plan_size(c["logits_and_loss"]),
               *([plan_size(c["communication_buffers"])] if several else []), p["peak_phase"]]
        if budget is not None:
            verdict = "fits" if p["fits"] else "does not fit"
            if p["fits"] and p["peak_bytes"] > 0.9 * budget:
                verdict = "fits (tight)"
            row += [verdict] + ["none fits" if n is None else f"{n:,}" for n in (p["max_batch_size"], p["max_seq_len"])]
        rows.append(row + [""])
    return headers, rows


def plan_size(n: int) -> str:
    """GiB with two decimals, or whole MiB below that: fractions of a MiB are noise in a prediction."""
    return format_bytes(n) if abs(n) >= GiB else format_bytes(n, digits=0, unit="MiB")


def train_summary(result: TrainResult) -> str:
    """What `adapters train` prints when it is done, or stopped."""
    p = result.parameters
    head = (f"{result.strategy} on {result.model} ({result.quantization}, {result.task}): "
            f"{p.trainable:,} of {p.total:,} parameters trained ({100 * p.fraction:.2f}%)")
    backoffs = [f"out of memory at step {b['step']}: micro-batch {b['from_batch_size']} -> {b['batch_size']}, "
                f"accumulation {b['from_gradient_accumulation_steps']} -> {b['gradient_accumulation_steps']}"
                for b in result.backoffs]
    if result.memory_fit:
        fit = result.memory_fit
        backoffs.insert(0, f"fitted into --memory-limit {format_bytes(fit['limit_bytes'])}: {fit['reason']}")
    if result.status != "completed":
        lines = [head, *backoffs, f"{result.status}: {result.reason}"]
        if result.checkpoints:
            lines.append(f"last checkpoint: {result.checkpoints[-1]}")
        if result.resume_command:
            lines.append(f"resume with: {result.resume_command}")
        return "\n".join(lines)
    metric = "perplexity" if result.task == "causal-lm" else "accuracy"
    return "\n".join([
        head, *backoffs,
        f"held-out loss {_measured(result.before['loss'], '.4f')} -> {_measured(result.after['loss'], '.4f')}, "
        f"{metric} {_measured(result.before[metric], '.4g')} -> {_measured(result.after[metric], '.4g')}",
        f"{result.steps} steps in {result.seconds:.1f} s, {result.tokens_per_s:,.0f} tokens/s",
        *([f"saved to {result.output}"] if result.output else []),
    ])


def _measured(value: float | None, spec: str) -> str:
    """A held-out metric, or a dash where it was not measured (--eval-batches 0)."""
    return "-" if value is None else format(value, spec)
