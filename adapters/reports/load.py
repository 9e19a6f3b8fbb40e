"""Reading reports: strict JSON, version checks and upgrades, then the typed model.

A report is strict JSON (no NaN or infinity). `load_report` refuses versions newer than this
adapters knows, upgrades older ones in memory, and decodes the rest through `model.Report`; every
problem becomes an `AdaptersError` on one line that names the file, the place at fault
(``$.results[0].step_s``) and a fix.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from ..errors import AdaptersError
from .model import SCHEMA_VERSION, Report

# Older versions upgrade one step at a time: _UPGRADES[n] turns a version-n report into n+1.
_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}

_RERUN = "Re-run `adapters bench` to write a valid report."


def _read(path: Path) -> dict[str, Any]:
    try:
        data = msgspec.json.decode(path.read_bytes())
    except FileNotFoundError:
        raise AdaptersError(f"{path}: file not found. Give the path of a report written by `adapters bench`.") from None
    except IsADirectoryError:
        raise AdaptersError(f"{path}: is a directory. Give the path of a report written by `adapters bench`.") from None
    except OSError as exc:
        raise AdaptersError(f"{path}: cannot read it ({exc.strerror}). Check the path and its permissions.") from None
    except msgspec.MsgspecError as exc:  # malformed JSON, NaN or infinity, numbers out of range
        raise AdaptersError(f"{path}: not a valid JSON report ({exc}). {_RERUN}") from None
    return data


def _current(data: Any, source: str) -> dict[str, Any]:
    """``data`` checked for a known schema_version and upgraded to the current one."""
    if not isinstance(data, dict) or "schema_version" not in data:
        raise AdaptersError(f"{source}: no schema_version; not a report written by `adapters bench`.")
    version = data["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise AdaptersError(f"{source}: schema_version {version!r} is not a known report version.")
    if version > SCHEMA_VERSION:
        raise AdaptersError(
            f"{source}: schema_version {version} is newer than this adapters reads ({SCHEMA_VERSION}). "
            "Upgrade adapters."
        )
    while version < SCHEMA_VERSION:
        data = _UPGRADES[version](data)
        version = data["schema_version"]
    for key in ("provenance", "settings", "results"):
        if key not in data:
            raise AdaptersError(f"{source}: missing {key!r}; the report is incomplete. {_RERUN}")
    return data


def _typed(data: dict[str, Any], source: str) -> Report:
    try:
        return msgspec.convert(data, Report)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `object`, got `str` - at `$.results[0].step_s`"
        problem, _, where = str(exc).partition(" - at ")
        where = where.strip("`") or "$"
        raise AdaptersError(f"{source}: invalid report at {where}: {problem[:1].lower()}{problem[1:]}. {_RERUN}") \
            from None


def _load(path: str | Path) -> tuple[dict[str, Any], Report]:
    path = Path(path)
    data = _current(_read(path), str(path))
    return data, _typed(data, str(path))


def load_report(path: str | Path) -> Report:
    """A report from disk, upgraded to the current version and typed; clear errors for anything else."""
    return _load(path)[1]


def read_report(path: str | Path) -> dict[str, Any]:
    """A report from disk as plain JSON data, upgraded and checked like `load_report`; unknown fields kept."""
    return _load(path)[0]


def as_report(report: Report | Mapping[str, Any], source: str = "report") -> Report:
    """``report`` as the typed model: a `Report` as it is, JSON data (e.g. from `run_bench`) checked and decoded."""
    if isinstance(report, Report):
        return report
    return _typed(_current(dict(report) if isinstance(report, Mapping) else report, source), source)
