"""Strategy options: ``--set key=value`` strings and TOML values, checked against the config dataclass."""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import AdaptersError


def parse_assignments(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["r=8", "target_modules=q_proj,v_proj"]`` -> ``{"r": "8", ...}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise AdaptersError(f"--set {pair!r} is not key=value. Write it like --set r=8.")
        out[key.strip()] = value.strip()
    return out


def convert_value(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert_value(value, arg, key)
            except AdaptersError as exc:
                errors.append(str(exc))
        raise AdaptersError(errors[0])
    if origin in (list, tuple):
        item = args[0] if args else str
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise AdaptersError(f"option {key!r} takes a list; write {key}=a,b")
        converted = [convert_value(v.strip() if isinstance(v, str) else v, item, key) for v in items]
        return converted if origin is list else tuple(converted)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise AdaptersError(f"option {key!r} takes true or false, not {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise AdaptersError(f"option {key!r} takes a number, not {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise AdaptersError(f"option {key!r} takes {hint.__name__}, not {value!r}; e.g. {key}={hint(1)}") from None
        if hint is int and isinstance(value, float) and value != number:
            raise AdaptersError(f"option {key!r} takes an integer, not {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise AdaptersError(f"option {key!r} takes a string, not {value!r}")
        return value
    return value


def build_config(config_class: type, values: dict[str, Any], strategy: str = "") -> Any:
    """An instance of ``config_class`` from raw values, each converted to its field's type."""
    hints = typing.get_type_hints(config_class)
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise AdaptersError(
            f"unknown option {unknown[0]!r} for strategy {strategy!r}. "
            f"Its options are: {', '.join(sorted(fields)) or '(none)'}."
        )
    kwargs = {k: convert_value(v, hints[k], k) for k, v in values.items()}
    try:
        return config_class(**kwargs)
    except (TypeError, ValueError) as exc:
        raise AdaptersError(f"invalid options for strategy {strategy!r}: {exc}") from None


def describe_options(config_class: type) -> list[dict[str, Any]]:
    """Each option's name, type and default, for listings."""
    hints = typing.get_type_hints(config_class)
    rows = []
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default})
    return rows


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML config file's table; errors name the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise AdaptersError(f"--config {path}: file not found. Check the path.") from None
    except tomllib.TOMLDecodeError as exc:
        raise AdaptersError(f"--config {path}: not valid TOML ({exc}). Fix the file's syntax.") from None


def settings_values(
    table: dict[str, Any], settings_class: type, where: str, nested: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A settings file's keys as ``settings_class`` field values, each converted to its field's type.

    Keys may use hyphens or underscores. ``where`` names the file in errors (e.g. "--config run.toml");
    ``nested`` names fields that are tables handled by the caller, not plain keys.
    """
    hints = typing.get_type_hints(settings_class)
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in hints or name in nested:
            known = [k.replace("_", "-") for k in hints if k not in nested] + [f"[{n}]" for n in nested]
            raise AdaptersError(f"{where}: unknown key {key!r}. Known keys: {', '.join(known)}.")
        try:
            values[name] = convert_value(value, hints[name], key)
        except AdaptersError as exc:
            raise AdaptersError(f"{where}: {exc}") from None
    return values
