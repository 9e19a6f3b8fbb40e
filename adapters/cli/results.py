"""Commands over benchmark reports: compare, report. They never import torch."""
from __future__ import annotations

import click

from . import cli


@cli.command()
@click.argument("reports", nargs=-1, metavar="BASE.json NEW.json")
@click.option("--reference", default=None, metavar="STRATEGY",
              help="With one report: every other strategy's speed and memory relative to this one.")
@click.option("--fail-on", "fail_on", multiple=True, metavar="METRIC:PCT",
              help="Exit 1 when METRIC is worse by more than PCT and beyond noise, e.g. tokens_per_s:5% (repeatable).")
@click.option("--allow-different-processes", is_flag=True,
              help="Compare reports whose runs had different process counts (--processes).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.pass_context
def compare(ctx: click.Context, reports: tuple[str, ...], reference: str | None, fail_on: tuple[str, ...],
            as_json: bool, allow_different_processes: bool) -> None:
    """Compare two benchmark reports (better / worse / noise), or strategies in one report against --reference."""
    from ..reports import run_compare

    output, code = run_compare(reports, reference=reference, fail_on=fail_on, as_json=as_json,
                               allow_different_processes=allow_different_processes)
    click.echo(output)
    ctx.exit(code)


@cli.command()
@click.argument("reports", nargs=-1, metavar="REPORT.json...")
@click.option("--output", default=None,
              help="File to write; its suffix picks the format (.html, .md, or a plugin's) [default: print markdown].")
@click.option("--format", "fmt", default=None, metavar="NAME",
              help="markdown, html, or a format a plugin adds [default: from the --output suffix].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@click.option("--label", "labels", multiple=True, metavar="NAME",
              help="What to call each report in charts and headings, once per report in order [default: file name].")
def report(reports: tuple[str, ...], output: str | None, fmt: str | None, overwrite: bool,
           labels: tuple[str, ...]) -> None:
    """Render benchmark reports as an HTML page with charts, as markdown tables, or in a plugin's format."""
    from ..reports import write_report

    text = write_report(list(reports), output, fmt, overwrite=overwrite, labels=list(labels))
    if output is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"report written to {output}")
