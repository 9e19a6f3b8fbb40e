"""What a training run logs while it runs: ``OUTPUT/metrics.jsonl`` and Accelerate's trackers.

One strict-JSON line per logged step: a value that is not finite is written as null, never as a
number, with the names of such values under ``"non_finite"``. Something that happened at a step
(an out-of-memory back-off) is a line of its own with an ``"event"`` key; the trackers get none.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


def clean(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``values`` with every non-finite number replaced by None, and the names of those."""
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    return {k: (None if k in bad else v) for k, v in values.items()}, bad


class MetricsLog:
    """Appends lines to ``metrics.jsonl`` (when the run has an output) and logs to the trackers."""

    def __init__(self, output: str | Path | None, accelerator, trackers: bool) -> None:
        self.path = Path(output) / METRICS if output else None
        self.accelerator = accelerator
        self.trackers = trackers

    def log(self, step: int, **values: Any) -> dict[str, Any]:
        """Record ``values`` for optimizer step ``step``; returns the line written."""
        line, bad = clean(values)
        record = {"step": step, **line, **({"non_finite": bad} if bad else {})}
        if self.accelerator.is_main_process:
            self._write(record)
            if self.trackers:
                self.accelerator.log({k: v for k, v in line.items() if isinstance(v, (int, float))}, step=step)
        return record

    def event(self, step: int, event: str, **values: Any) -> dict[str, Any]:
        """Record that ``event`` happened at optimizer step ``step``, in ``metrics.jsonl`` only."""
        record = {"step": step, "event": event, **clean(values)[0]}
        if self.accelerator.is_main_process:
            self._write(record)
        return record

    def _write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:  # a line at a time: a crash loses at most the last one
                f.write(json.dumps(record, allow_nan=False) + "\n")
