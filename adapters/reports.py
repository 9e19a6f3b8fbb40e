"""Benchmark reports: the versioned format, a loader that checks it, and the metrics compared.

A report is strict JSON (no NaN or infinity) described by ``schemas/report-v<N>.schema.json``.
`load_report` refuses versions newer than this adapters knows and upgrades older ones in memory.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AdaptersError

SCHEMA_VERSION = 1
SCHEMA_DIR = Path(__file__).parent / "schemas"

# Older versions upgrade one step at a time: _UPGRADES[n] turns a version-n report into n+1.
_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def schema(version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """The JSON Schema of a report version."""
    return json.loads((SCHEMA_DIR / f"report-v{version}.schema.json").read_text())


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON value {name}")


def load_report(path: str | Path) -> dict[str, Any]:
    """A report from disk, upgraded to the current version; clear errors for anything else."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise AdaptersError(f"{path}: file not found. Give the path of a report written by `adapters bench`.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdaptersError(f"{path}: not a valid JSON report ({exc}). Re-run `adapters bench`.") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise AdaptersError(f"{path}: no schema_version; not a report written by `adapters bench`.")
    version = data["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise AdaptersError(f"{path}: schema_version {version!r} is not a known report version.")
    if version > SCHEMA_VERSION:
        raise AdaptersError(
            f"{path}: schema_version {version} is newer than this adapters reads ({SCHEMA_VERSION}). Upgrade adapters."
        )
    while version < SCHEMA_VERSION:
        data = _UPGRADES[version](data)
        version = data["schema_version"]
    for key in ("provenance", "settings", "results"):
        if key not in data:
            raise AdaptersError(f"{path}: missing {key!r}; the report is incomplete. Re-run `adapters bench`.")
    return data


@dataclass(frozen=True)
class Metric:
    """A number compared between reports, and which direction is better."""

    name: str
    label: str
    unit: str
    higher_is_better: bool
    get: Callable[[dict[str, Any]], float | None]
    timed: bool  # derived from step times, so their repeat spread is its noise


def _dig(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    def get(result: dict[str, Any]) -> float | None:
        value: Any = result
        for key in keys:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return get


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("tokens_per_s", "tokens/s", "tok/s", True, _dig("tokens_per_s"), True),
    Metric("step_time", "step time", "s", False, _dig("step_s", "median"), True),
    Metric("peak_memory", "peak memory", "bytes", False, _dig("memory", "peak_bytes"), False),
    Metric("load_time", "load time", "s", False, _dig("load_s"), False),
    Metric("mfu", "MFU", "", True, _dig("mfu"), True),
    Metric("energy_per_token", "energy/token", "J", False, _dig("energy_j_per_token"), True),
    Metric("heldout_loss", "held-out loss", "", False, _dig("quality", "after", "loss"), False),
    Metric("accuracy", "held-out accuracy", "", True, _dig("quality", "after", "accuracy"), False),
]}
