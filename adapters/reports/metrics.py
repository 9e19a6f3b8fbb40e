"""The numbers compared between reports: how to read each from a result, which way is better, how to show it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..text import format_bytes

if TYPE_CHECKING:
    from .model import OkResult


@dataclass(frozen=True)
class Metric:
    """A number compared between reports, and which direction is better."""

    name: str
    label: str
    unit: str
    higher_is_better: bool
    get: Callable[[OkResult], float | None]
    timed: bool  # derived from step times, so their repeat spread is its noise (load time: its loads' spread)
    show: Callable[[float], str] = lambda v: f"{v:.4f}"

    def format(self, value: float | None) -> str:
        """``value`` in human units (``-`` when absent), e.g. ``2,560 tok/s`` or ``100.0 MiB``."""
        return "-" if value is None else self.show(value)

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


def _after(key: str) -> Callable[[OkResult], float | None]:
    """Held-out ``key`` after the quality steps, when they were measured (a failed quality run has none)."""

    def get(result: OkResult) -> float | None:
        quality = result.quality
        ok = quality is not None and quality.status == "ok" and quality.after
        return quality.after.get(key) if ok else None

    return get


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("tokens_per_s", "tokens/s", "tok/s", True, lambda r: r.tokens_per_s, True, lambda v: f"{v:,.0f} tok/s"),
    Metric("step_time", "step time", "s", False, lambda r: r.step_s.median, True, lambda v: f"{v * 1000:,.2f} ms"),
    Metric("peak_memory", "peak memory", "bytes", False, lambda r: r.memory.peak_bytes, False,
           lambda v: format_bytes(v, digits=1, unit="MiB")),
    Metric("load_time", "load time", "s", False, lambda r: r.load_s, False, lambda v: f"{v:.2f} s"),
    Metric("mfu", "MFU", "", True, lambda r: r.mfu, True, lambda v: f"{100 * v:.2f}%"),
    Metric("energy_per_token", "energy/token", "J", False, lambda r: r.energy_j_per_token, True,
           lambda v: f"{v:.4g} J"),
    Metric("heldout_loss", "held-out loss", "", False, _after("loss"), False),
    Metric("accuracy", "held-out accuracy", "", True, _after("accuracy"), False),
]}
