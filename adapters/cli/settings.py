"""Command-line options generated from `RunSpec`'s declarations: one name, type, default and help per setting.

``adapters train``, ``bench`` and ``plan`` each take the settings whose declaration names them
(`adapters.runspec.setting`); `spec_options` adds them to a command, and `given` reads back the ones typed on the
command line, so that a config file, a suite or a recorded run supplies the rest.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from ..options import parse_assignments
from ..runspec import RunSpec, fields_for

_HINTS = typing.get_type_hints(RunSpec)


def spec_options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator that gives a click command an option for each `RunSpec` field ``command`` takes."""
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for field in reversed(fields_for(command)):
            function = _option(field)(function)
        return function

    return decorate


def _option(field: dataclasses.Field) -> Callable[..., Any]:
    """The click option of one `RunSpec` field."""
    meta, name, hint = field.metadata, field.name, _HINTS[field.name]
    flag = f"--{(meta['option'] or name).replace('_', '-')}"
    common = {"help": meta["help"], "metavar": meta["metavar"]}
    default = None if field.default is dataclasses.MISSING else field.default
    if name == "resume":  # --resume OUTPUT: the run to continue, which is its output too
        return click.option(flag, name, default=None, **common)
    if name == "options" or typing.get_origin(hint) is list:  # --set KEY=VALUE, --report-to X: repeatable
        return click.option(flag, name, multiple=True, **common)
    if hint is bool:
        return click.option(flag, name, is_flag=True, default=default, help=meta["help"])
    if hint == bool | None:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=meta["help"])
    kind = click.Choice(meta["choices"]) if meta["choices"] else _scalar(hint)
    return click.option(flag, name, type=kind, default=default, show_default=default is not None, **common)


def _scalar(hint: Any) -> type:
    """int, float or str: what an option of type ``hint`` (or ``hint | None``) holds."""
    for kind in (int, float):
        if hint is kind or hint == kind | None:
            return kind
    return str


def given(ctx: click.Context, command: str) -> dict[str, Any]:
    """The `RunSpec` values typed on ``command``'s command line (not its defaults), as spec values; ``--set``
    assignments under ``options`` and ``--resume OUTPUT`` as ``resume`` and ``output``."""
    values: dict[str, Any] = {}
    for field in fields_for(command):
        if ctx.get_parameter_source(field.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[field.name]
        if field.name == "options":
            value = parse_assignments(value)
        elif field.name == "resume":
            values["output"], value = value, True
        elif isinstance(value, tuple):
            value = list(value)
        values[field.name] = value
    return values
