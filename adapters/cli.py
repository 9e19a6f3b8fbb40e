"""The `adapters` command line: thin commands over the library functions.

A user error prints ``Error: <reason>`` on one line, without a traceback, and exits with code 2.
"""
from __future__ import annotations

import json
import logging
import sys
import warnings
from typing import Any

import click
from click.core import ParameterSource

from .errors import AdaptersError
from .text import aligned_table


class _KernelNoticeFilter(logging.Filter):
    """Drops bitsandbytes' import-time notice that the optional `kernels` package is missing.

    It goes to stderr through logging's last-resort handler and would precede every error line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


_KERNEL_NOTICE_FILTER = _KernelNoticeFilter()


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, allow_nan=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapters-lab")
def cli() -> None:
    """Fine-tune quantized pre-trained models with pluggable strategies, and compare them."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def strategies(as_json: bool) -> None:
    """List the registered strategies, their plugins, quantizations, tasks and options."""
    from .contract import traits
    from .host import get_registry
    from .options import describe_options

    rows = []
    for entry in get_registry().entries():
        s = entry.strategy
        rows.append({
            "name": s.name,
            "description": s.description,
            "plugin": entry.plugin,
            "supported_quantization": sorted(s.supported_quantization),
            "supported_tasks": sorted(s.supported_tasks),
            "default_quantization": traits(s).default_quantization,
            "supports_gradient_checkpointing": traits(s).supports_gradient_checkpointing,
            "options": describe_options(s.config_class),
        })
    if as_json:
        _echo_json(rows)
        return
    click.echo(aligned_table(
        [[r["name"], ",".join(r["supported_quantization"]), ",".join(r["supported_tasks"]),
          " ".join(f"{o['name']}={o['default']}" for o in r["options"]) or "-", r["description"]] for r in rows],
        ["name", "quantization", "tasks", "options (defaults)", "description"],
    ))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json: bool) -> None:
    """List the loaded plugins, with their distributions, hooks and strategies."""
    from .host import list_plugins

    rows = list_plugins()
    if as_json:
        _echo_json(rows)
        return
    click.echo(aligned_table(
        [[r["name"], f"{r['distribution']} {r.get('version', '')}".strip(),
          ", ".join(r.get("strategies", [])) or "-",
          r.get("error", "") or "; ".join(r.get("collisions", []))] for r in rows],
        ["plugin", "distribution", "strategies", "error"],
    ))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json: bool) -> None:
    """List the named models and whether each is available locally."""
    from .models import model_status

    rows = model_status()
    if as_json:
        _echo_json(rows)
        return
    click.echo(aligned_table(
        [[r["name"], "yes" if r["available"] else "no", "yes" if r["cached"] else "no", ",".join(r["tasks"]),
          r["install"] or r["description"]] for r in rows],
        ["name", "available", "cached", "tasks", "description / how to install"],
    ))


@cli.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="Model name, local directory or hub id.")
@click.option("--strategy", default="lora", show_default=True, help="Strategy name; NAME@QUANT also sets quantization.")
@click.option("--quantization", type=click.Choice(["none", "nf4", "fp4", "int8"]), default=None,
              help="Quantize the base (default: the strategy's own, e.g. nf4 for qlora).")
@click.option("--task", type=click.Choice(["causal-lm", "sequence-classification"]), default=None,
              help="Default: the model's own.")
@click.option("--data", default=None, help=".txt, .jsonl or .csv file (default: built-in real text).")
@click.option("--max-steps", type=int, default=20, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--gradient-accumulation-steps", type=int, default=1, show_default=True)
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option("--learning-rate", type=float, default=None, help="Default: the strategy's own.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward to save memory.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-batches", type=int, default=8, show_default=True)
@click.option("--output", default=None, help="Directory to save the trained strategy in.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output directory.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="A strategy option (repeatable).")
@click.option("--config", "config_file", default=None, help="TOML file of settings; flags given here win.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def train(
    ctx: click.Context, assignments: tuple[str, ...], config_file: str | None, as_json: bool, **flags: Any
) -> None:
    """Train a strategy on a base model, evaluate it before and after, and save it."""
    from .options import parse_assignments
    from .runspec import spec_from
    from .training import train as run_training

    given = {k: v for k, v in flags.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    settings = spec_from(config_file, given, parse_assignments(assignments))
    result = run_training(settings, progress=True)
    if not result.main_process:  # in data-parallel runs, one process reports for all
        return
    summary = {
        "strategy": result.strategy, "model": result.model, "quantization": result.quantization,
        "task": result.task, "steps": result.steps,
        "trainable_parameters": result.parameters.trainable, "total_parameters": result.parameters.total,
        "heldout_before": result.before, "heldout_after": result.after,
        "tokens_per_s": round(result.tokens_per_s, 1), "seconds": round(result.seconds, 2),
        "processes": result.processes, "output": str(result.output) if result.output else None,
    }
    if as_json:
        _echo_json(summary)
        return
    p = result.parameters
    metric = "perplexity" if result.task == "causal-lm" else "accuracy"
    click.echo(
        f"{result.strategy} on {result.model} ({result.quantization}, {result.task}): "
        f"{p.trainable:,} of {p.total:,} parameters trained ({100 * p.fraction:.2f}%)\n"
        f"held-out loss {result.before['loss']:.4f} -> {result.after['loss']:.4f}, "
        f"{metric} {result.before[metric]:.4g} -> {result.after[metric]:.4g}\n"
        f"{result.steps} steps in {result.seconds:.1f} s, {result.tokens_per_s:,.0f} tokens/s"
        + (f"\nsaved to {result.output}" if result.output else "")
    )


@cli.command()
@click.option("--suite", default=None, help="TOML suite file (benchmarks/suites/*.toml); flags given here win.")
@click.option("--model", default=None, help="Model name [default: smollm2-135m].")
@click.option("--strategies", default=None, help="Comma-separated names, NAME@QUANT allowed.")
@click.option("--task", type=click.Choice(["causal-lm", "sequence-classification"]), default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--seq-len", type=int, default=None)
@click.option("--steps", type=int, default=None, help="Timed steps per repeat.")
@click.option("--warmup", type=int, default=None, help="Untimed steps first.")
@click.option("--repeats", type=int, default=None)
@click.option("--gradient-checkpointing", is_flag=True, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--quality-steps", type=int, default=None, help="Also measure held-out quality over this many steps.")
@click.option("--find-max-batch", is_flag=True, help="Search each strategy's largest batch size by real runs.")
@click.option("--find-max-seq-len", is_flag=True, help="Search each strategy's largest sequence length by real runs.")
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="With --find-max-*: a try whose peak exceeds SIZE (e.g. 4GiB) fails; required on the CPU.")
@click.option("--output", default=None, help="Report file [default: bench-<model>-<time>.json]; never overwritten.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def bench(suite: str | None, as_json: bool, find_max_batch: bool, find_max_seq_len: bool, **flags: Any) -> None:
    """Benchmark strategies for memory and speed, each in a fresh process.

    Every measured peak has the plan's prediction beside it (see `adapters plan`), with its error.
    """
    import time

    from .bench import run_bench, settings_from
    from .bench.table import print_summary

    given = {k: v for k, v in flags.items() if v is not None}
    if find_max_batch and find_max_seq_len:
        raise AdaptersError("give one of --find-max-batch and --find-max-seq-len; search one at a time.")
    if find_max_batch or find_max_seq_len:
        given["find_max"] = "batch_size" if find_max_batch else "seq_len"
    if "strategies" in given:
        given["strategies"] = [s.strip() for s in given["strategies"].split(",") if s.strip()]
    settings = settings_from(suite, given)
    if settings.output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        settings.output = f"bench-{settings.model.replace(':', '-').replace('/', '-')}-{stamp}.json"
    report = run_bench(settings)
    if as_json:
        _echo_json(report)
        return
    print_summary(report)
    click.echo(f"report written to {settings.output}")


@cli.command()
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Model name, local directory (config.json is enough) or hub id.")
@click.option("--strategy", "--strategies", "strategies", default="lora", show_default=True,
              help="Comma-separated names, NAME@QUANT allowed, or `all` for every strategy and quantization.")
@click.option("--quantization", type=click.Choice(["none", "nf4", "fp4", "int8"]), default=None,
              help="Quantize the base (default: each strategy's own).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--task", type=click.Choice(["causal-lm", "sequence-classification"]), default=None)
@click.option("--gradient-checkpointing", is_flag=True, help="Plan with activations recomputed in backward.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cuda: bf16 under autocast, as training on a GPU runs; cpu: fp32.")
@click.option("--budget", default=None, metavar="SIZE",
              help="Memory to fit in (e.g. 24GiB): a verdict, and the largest batch and sequence that fit.")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="A strategy option (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(strategies: str, quantization: str | None, assignments: tuple[str, ...], as_json: bool,
         **flags: Any) -> None:
    """Predict each strategy's peak memory from the model's config alone, without loading weights."""
    from .options import parse_assignments
    from .plan import PlanSettings, make_plans
    from .runspec import split_strategy

    specs = [s.strip() for s in strategies.split(",") if s.strip()]
    if quantization and specs != ["all"]:
        specs = [f"{split_strategy(s, quantization)[0]}@{quantization}" for s in specs]
    settings = PlanSettings(strategies=specs, options=parse_assignments(assignments), **flags)
    result = make_plans(settings)
    if as_json:
        _echo_json(result)
        return
    headers, rows = _plan_rows(result)
    click.echo(f"{result['model']} ({result['task']}) on {result['device']}, {result['dtype']}: "
               f"batch {result['batch_size']} x seq {result['seq_len']}"
               + (", gradient checkpointing" if result["gradient_checkpointing"] else ""))
    click.echo(aligned_table(rows, headers))
    if result["device"] == "cuda":
        click.echo("Peaks are tensor memory, as torch.cuda.max_memory_allocated reports it; the CUDA context "
                   "and the allocator's cache need about 1 GiB more.")


def _plan_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the plan table."""
    budget = result["budget_bytes"]
    headers = ["strategy", "peak", "weights", "train+grad+opt", "activations", "logits+loss", "peak at"]
    if budget is not None:
        headers += ["verdict", "max batch", "max seq"]
    headers.append("notes")
    rows = []
    for p in result["plans"]:
        if p["status"] != "ok":
            rows.append([p["strategy"], p["status"]] + [""] * (len(headers) - 3) + [p["message"] or ""])
            continue
        c = p["components"]
        row = [p["strategy"], _plan_size(p["peak_bytes"]),
               _plan_size(c["base_weights_quantized"] + c["base_weights_unquantized"]),
               _plan_size(c["trainable_parameters"] + c["gradients"] + c["optimizer_state"] + c["optimizer_step"]),
               _plan_size(c["activations"]), _plan_size(c["logits_and_loss"]), p["peak_phase"]]
        if budget is not None:
            verdict = "fits" if p["fits"] else "does not fit"
            if p["fits"] and p["peak_bytes"] > 0.9 * budget:
                verdict = "fits (tight)"
            row += [verdict] + ["none fits" if n is None else f"{n:,}" for n in (p["max_batch_size"], p["max_seq_len"])]
        rows.append(row + [""])
    return headers, rows


def _plan_size(n: int) -> str:
    """GiB with two decimals, or whole MiB below that: fractions of a MiB are noise in a prediction."""
    from .text import GiB, format_bytes

    return format_bytes(n) if abs(n) >= GiB else format_bytes(n, digits=0, unit="MiB")


@cli.command()
@click.argument("reports", nargs=-1, metavar="BASE.json NEW.json")
@click.option("--reference", default=None, metavar="STRATEGY",
              help="With one report: every other strategy's speed and memory relative to this one.")
@click.option("--fail-on", "fail_on", multiple=True, metavar="METRIC:PCT",
              help="Exit 1 when METRIC is worse by more than PCT and beyond noise, e.g. tokens_per_s:5% (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.pass_context
def compare(ctx: click.Context, reports: tuple[str, ...], reference: str | None, fail_on: tuple[str, ...],
            as_json: bool) -> None:
    """Compare two benchmark reports (better / worse / noise), or strategies in one report against --reference."""
    from .reports import run_compare

    output, code = run_compare(reports, reference=reference, fail_on=fail_on, as_json=as_json)
    click.echo(output)
    ctx.exit(code)


@cli.command()
@click.argument("reports", nargs=-1, metavar="REPORT.json...")
@click.option("--output", default=None, help="File to write (.html or .md) [default: print markdown].")
@click.option("--format", "fmt", default=None, metavar="html|markdown", help="[default: from the --output suffix]")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@click.option("--label", "labels", multiple=True, metavar="NAME",
              help="What to call each report in charts and headings, once per report in order [default: file name].")
def report(reports: tuple[str, ...], output: str | None, fmt: str | None, overwrite: bool,
           labels: tuple[str, ...]) -> None:
    """Render benchmark reports as an HTML page with charts, or as markdown tables."""
    from .reports import write_report

    text = write_report(list(reports), output, fmt, overwrite=overwrite, labels=list(labels))
    if output is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"report written to {output}")


def _split_choices(values: tuple[str, ...]) -> list[str] | None:
    """Repeatable options that also take comma-separated values: --quantization nf4,int8."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()] or None


@cli.command()
@click.argument("strategy")
@click.option("--quantization", "quantizations", multiple=True, metavar="QUANT[,QUANT]",
              help="Only these quantizations (none, nf4, fp4, int8; repeatable) [default: all].")
@click.option("--task", "tasks", multiple=True, metavar="TASK[,TASK]",
              help="Only these tasks (causal-lm, sequence-classification; repeatable) [default: all].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (with each failure's traceback).")
@click.option("--traceback", "tracebacks", is_flag=True, help="After the table, print each failed check's traceback.")
@click.pass_context
def check(ctx: click.Context, strategy: str, quantizations: tuple[str, ...], tasks: tuple[str, ...],
          as_json: bool, tracebacks: bool) -> None:
    """Run the conformance checks on STRATEGY and print a pass/fail table; exit 1 on any failure."""
    from .testing import run_checks

    report = run_checks(strategy, quantizations=_split_choices(quantizations), tasks=_split_choices(tasks))
    if as_json:
        _echo_json(report.to_dict())
    else:
        click.echo(report.table())
        if tracebacks and report.tracebacks():
            click.echo(f"\n{report.tracebacks()}\n")
        click.echo(report.summary())
    ctx.exit(0 if report.passed else 1)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown", show_default=True)
@click.option("--strategies", default=None, help="Comma-separated names [default: every registered strategy].")
@click.option("--readme", default=None, metavar="FILE",
              help="Also rewrite the block between <!-- matrix:start --> and <!-- matrix:end --> in FILE.")
def matrix(fmt: str, strategies: str | None, readme: str | None) -> None:
    """Probe every strategy x quantization x task by running the checks; print the capability matrix."""
    from .testing import matrix as capability

    names = [n.strip() for n in strategies.split(",") if n.strip()] if strategies else None
    reports = capability.probe(names, progress=lambda name: click.echo(f"probing {name} ...", err=True))
    markdown = capability.to_markdown(reports)
    if readme:
        changed = capability.update_readme(readme, markdown)
        click.echo(f"{readme}: {'updated' if changed else 'already current'}", err=True)
    if fmt == "json":
        _echo_json(capability.to_json(reports))
    else:
        click.echo(markdown, nl=False)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A skipped plugin is reported on one line, without the source location of the warning."""
    from .host import PluginWarning

    if isinstance(category, type) and issubclass(category, PluginWarning):
        return f"Warning: {message}\n"
    return _FORMAT_WARNING(message, category, filename, lineno, line)


_FORMAT_WARNING = warnings.formatwarning


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KERNEL_NOTICE_FILTER)
    warnings.formatwarning = _format_warning
    try:
        code = cli.main(args=argv, prog_name="adapters", standalone_mode=False)
    except AdaptersError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted; nothing was saved.", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
