"""Commands that list what is installed and check it: strategies, plugins, models, check, matrix."""
from __future__ import annotations

import click

from ..text import aligned_table
from . import cli, echo_json


@cli.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def strategies(names: tuple[str, ...], as_json: bool) -> None:
    """List the registered strategies: their quantizations, tasks and descriptions. With NAMEs, each one's plugin
    and options, with their types and defaults (what `--set` takes)."""
    from ..contract import traits
    from ..host import get_registry
    from ..options import describe_options

    registry = get_registry()
    entries = [registry.entry(name) for name in names] if names else registry.entries()
    rows = []
    for entry in entries:
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
        echo_json(rows)
    elif names:
        click.echo("\n\n".join(_strategy_details(r) for r in rows))
    else:
        click.echo(aligned_table(
            [[r["name"], ",".join(r["supported_quantization"]), ",".join(r["supported_tasks"]), r["description"]]
             for r in rows], ["name", "quantization", "tasks", "description"]))
        click.echo(f"{len(rows)} strategies; `adapters strategies NAME` shows one's options.")


def _strategy_details(row: dict) -> str:
    """One strategy as `adapters strategies NAME` shows it: what it is, and its options."""
    lines = [f"{row['name']}: {row['description']} (plugin {row['plugin']})",
             f"quantization: {', '.join(row['supported_quantization'])} (default {row['default_quantization']}); "
             f"tasks: {', '.join(row['supported_tasks'])}; gradient checkpointing: "
             f"{'yes' if row['supports_gradient_checkpointing'] else 'no'}"]
    if not row["options"]:
        return "\n".join([*lines, "options: none"])
    table = aligned_table([[o["name"], o["type"], str(o["default"])] for o in row["options"]],
                          ["option", "type", "default"])
    return "\n".join([*lines, table])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--no-import", "no_import", is_flag=True,
              help="List the installed entry points from package metadata, importing none of them.")
def plugins(as_json: bool, no_import: bool) -> None:
    """List the loaded plugins, with their distributions, hooks, strategies, report formats and data readers."""
    from ..host import entry_points, list_plugins

    if no_import:  # works even when a plugin breaks the tool at import: find it, then disable it
        rows = entry_points()
        if as_json:
            echo_json(rows)
            return
        click.echo(aligned_table(
            [[r["name"], r["value"], f"{r['distribution']} {r['version']}",
              "yes" if r["loads"] else f"no ({r['reason']})"] for r in rows],
            ["entry point", "value", "distribution", "loads"],
        ))
        return
    rows = list_plugins()
    if as_json:
        echo_json(rows)
        return
    click.echo(aligned_table(
        [[r["name"], f"{r['distribution']} {r.get('version', '')}".strip(),
          ", ".join(r.get("strategies", [])) or "-",
          ", ".join([*r.get("report_formats", []), *r.get("data_readers", [])]) or "-",
          r.get("error", "") or "; ".join(r.get("collisions", []))] for r in rows],
        ["plugin", "distribution", "strategies", "report formats, data readers", "error"],
    ))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json: bool) -> None:
    """List the named models and whether each is available locally."""
    from ..models import model_status

    rows = model_status()
    if as_json:
        echo_json(rows)
        return
    click.echo(aligned_table(
        [[r["name"], "yes" if r["available"] else "no", "yes" if r["cached"] else "no", ",".join(r["tasks"]),
          r["install"] or r["description"]] for r in rows],
        ["name", "available", "cached", "tasks", "description / how to install"],
    ))


def _split_choices(values: tuple[str, ...]) -> list[str] | None:
    """Repeatable options that also take comma-separated values: --quantization nf4,int8."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()] or None


@cli.command()
@click.argument("strategy")
@click.option("--quantization", "quantizations", multiple=True, metavar="QUANT[,QUANT]",
              help="Only these quantizations (none, nf4, fp4, int8; repeatable) [default: all].")
@click.option("--task", "tasks", multiple=True, metavar="TASK[,TASK]",
              help="Only these tasks (causal-lm, sequence-classification; repeatable) [default: all].")
@click.option("--with", "optional", multiple=True, metavar="CHECK",
              help="Also run this optional check (distributed: 2 processes learn what 1 does; repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (with each failure's traceback).")
@click.option("--traceback", "tracebacks", is_flag=True, help="After the table, print each failed check's traceback.")
@click.pass_context
def check(ctx: click.Context, strategy: str, quantizations: tuple[str, ...], tasks: tuple[str, ...],
          optional: tuple[str, ...], as_json: bool, tracebacks: bool) -> None:
    """Run the conformance checks on STRATEGY and print a pass/fail table; exit 1 on any failure."""
    from ..testing import run_checks

    report = run_checks(strategy, quantizations=_split_choices(quantizations), tasks=_split_choices(tasks),
                        optional=_split_choices(optional) or ())
    if as_json:
        echo_json(report.to_dict())
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
    from ..testing import matrix as capability

    names = [n.strip() for n in strategies.split(",") if n.strip()] if strategies else None
    reports = capability.probe(names, progress=lambda name: click.echo(f"probing {name} ...", err=True))
    markdown = capability.to_markdown(reports)
    if readme:
        changed = capability.update_readme(readme, markdown)
        click.echo(f"{readme}: {'updated' if changed else 'already current'}", err=True)
    if fmt == "json":
        echo_json(capability.to_json(reports))
    else:
        click.echo(markdown, nl=False)
