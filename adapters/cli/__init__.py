"""The `adapters` command line: thin commands over the library functions.

Each command parses flags, calls one library function, and renders what it returns (tables in
`adapters.cli.tables`). A user error prints ``Error: <reason>`` on one line, without a traceback,
and exits with code 2. Nothing heavy is imported here: a command imports what it needs when it runs.

- `adapters.cli.catalog`: strategies, plugins, models, check, matrix
- `adapters.cli.runs`: train, bench, plan
- `adapters.cli.results`: compare, report
"""
from __future__ import annotations

import json
import logging
import sys
import warnings
from typing import Any

import click

from ..errors import AdaptersError, NothingKept, OtherBase, OutOfMemoryBackoff, TokenizerFallback


class _KernelNoticeFilter(logging.Filter):
    """Drops bitsandbytes' import-time notice that the optional `kernels` package is missing.

    It goes to stderr through logging's last-resort handler and would precede every error line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


_KERNEL_NOTICE_FILTER = _KernelNoticeFilter()


def echo_json(data: Any) -> None:
    """Strict JSON on stdout."""
    click.echo(json.dumps(data, indent=2, allow_nan=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapters-lab")
def cli() -> None:
    """Fine-tune quantized pre-trained models with pluggable strategies, and compare them."""


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A skipped plugin, an out-of-memory back-off, another base, a tokenizer fallback: one line, no location."""
    from ..host import PluginWarning

    said_once = (PluginWarning, OutOfMemoryBackoff, OtherBase, TokenizerFallback)
    if isinstance(category, type) and issubclass(category, said_once):
        return f"Warning: {message}\n"
    if isinstance(category, type) and issubclass(category, NothingKept):
        return f"Note: {message}\n"
    return _FORMAT_WARNING(message, category, filename, lineno, line)


_FORMAT_WARNING = warnings.formatwarning


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KERNEL_NOTICE_FILTER)
    warnings.formatwarning = _format_warning
    # transformers 5 warns about its own deprecated name whenever PEFT wraps a model.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
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
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


from . import catalog, results, runs, shipping, using  # noqa: E402, F401  (each module adds its commands to `cli`)
