"""Which measured candidate wins, and why each other lost, by `adapters compare`'s noise rules.

Three things are compared: the held-out loss after the same number of training tokens, tokens/s, and the
measured peak memory. One candidate is *better* than another on a metric only when the change is outside the
noise band that `adapters.reports.compare.noise_band` gives for the two results (tokens/s: the step-time ranges
overlap, at least ±2%; peak memory and held-out loss: ±1%). Nothing here measures: it reads bench's results.

- **The Pareto front**: the candidates that no other *dominates* (at least as good on all three, beyond noise
  better on one).
- **The recommendation**: on the front, the lowest held-out loss; among those within noise of it, the fastest;
  among those within noise of that, the smallest. When two are still within noise on all three, both are
  named (``within_noise``): either is as good as the other by these measurements.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..reports.compare import noise_band
from ..reports.metrics import METRICS
from ..reports.model import OkResult

LOSS, SPEED, MEMORY = "heldout_loss", "tokens_per_s", "peak_memory"


@dataclass
class Measured:
    """One candidate's measurements: the speed run's result (tokens/s, peak) and the learning run's (loss)."""

    name: str
    speed: OkResult
    learning: OkResult

    @property
    def loss(self) -> float:
        return self.learning.quality.after["loss"]

    @property
    def tokens_per_s(self) -> float:
        return self.speed.tokens_per_s

    @property
    def peak_bytes(self) -> int:
        return self.speed.memory.peak_bytes

    def value(self, metric: str) -> float:
        return {LOSS: self.loss, SPEED: self.tokens_per_s, MEMORY: self.peak_bytes}[metric]

    def result(self, metric: str) -> OkResult:
        return self.learning if metric == LOSS else self.speed


def compared(a: Measured, b: Measured, metric: str) -> int:
    """+1 when ``a`` is better than ``b`` on ``metric`` beyond noise, -1 when worse, 0 when within noise."""
    low, high = noise_band(METRICS[metric], a.result(metric), b.result(metric))
    ratio = b.value(metric) / a.value(metric) if a.value(metric) else float("inf")  # b relative to a
    if low <= ratio <= high:
        return 0
    b_higher = ratio > high
    return 1 if b_higher != METRICS[metric].higher_is_better else -1


def dominates(a: Measured, b: Measured) -> bool:
    """``a`` is at least as good as ``b`` on all three metrics and better beyond noise on one."""
    signs = [compared(a, b, m) for m in (LOSS, SPEED, MEMORY)]
    return min(signs) >= 0 and max(signs) > 0


def front(candidates: Sequence[Measured]) -> list[Measured]:
    """The candidates no other dominates, in the order given."""
    return [c for c in candidates if not any(dominates(o, c) for o in candidates if o is not c)]


@dataclass
class Ranking:
    """The measured candidates ranked: the recommended one first, with a reason for every other."""

    order: list[Measured]
    front: list[str]
    recommended: str
    within_noise: list[str]  # the candidates as good as the recommended one within noise (itself included), or []
    why: str
    lost: dict[str, str] = field(default_factory=dict)  # name -> why it was not recommended


def _tier(candidates: list[Measured], metric: str) -> list[Measured]:
    """The best on ``metric`` and those within noise of it, best first."""
    best = max(candidates, key=lambda c: c.value(metric) * (1 if METRICS[metric].higher_is_better else -1))
    tied = [c for c in candidates if c is not best and compared(best, c, metric) == 0]
    return [best, *tied]


def rank(candidates: Sequence[Measured]) -> Ranking:
    """The recommendation among ``candidates`` (at least one), the front, and why each other lost."""
    on_front = front(candidates)
    tier = _tier(on_front, LOSS)
    by_loss = len(tier) == 1
    tier = _tier(tier, SPEED)
    by_speed = not by_loss and len(tier) == 1
    tier = _tier(tier, MEMORY)
    chosen = tier[0]
    within = [c.name for c in tier] if len(tier) > 1 else []
    why = _why_chosen(chosen, on_front, by_loss, by_speed, within)
    rest = sorted((c for c in candidates if c is not chosen),
                  key=lambda c: (c not in on_front, c.name not in within, c.loss))
    lost = {c.name: _why_lost(c, chosen, candidates, on_front) for c in rest}
    return Ranking([chosen, *rest], [c.name for c in on_front], chosen.name, within, why, lost)


def _ratio(a: Measured, b: Measured, metric: str) -> str:
    """``a`` against ``b`` on ``metric``, in words: "+4.1% loss", "0.62x the speed", "1.8x the memory"."""
    r = a.value(metric) / b.value(metric)
    if metric == LOSS:
        return f"{100 * (r - 1):+.1f}% held-out loss"
    return f"{r:.2f}x the {'tokens/s' if metric == SPEED else 'peak memory'}"


def _why_chosen(c: Measured, on_front: list[Measured], by_loss: bool, by_speed: bool, within: list[str]) -> str:
    others = [o for o in on_front if o is not c]
    if within:
        names = " and ".join(within)
        return (f"{names} are within noise of each other on held-out loss, tokens/s and peak memory: either will do; "
                f"{c.name} is listed first for its lower loss ({c.loss:.4f}).")
    if by_loss:
        reason = f"the lowest held-out loss ({c.loss:.4f}), beyond noise"
    elif by_speed:
        reason = f"the fastest ({c.tokens_per_s:,.0f} tokens/s) of those within noise of the lowest held-out loss"
    else:
        reason = "the smallest peak memory of those within noise of the lowest held-out loss and the top speed"
    if not others:
        return f"{c.name}: {reason}; it is the whole Pareto front: no measured candidate is better on any of the three."
    trade = "; ".join(f"{o.name} has {_ratio(o, c, LOSS)} at {_ratio(o, c, SPEED)} and {_ratio(o, c, MEMORY)}"
                      for o in others)
    return f"{c.name}: {reason}. The trade-off on the front: {trade}."


def _why_lost(c: Measured, chosen: Measured, everyone: Sequence[Measured], on_front: list[Measured]) -> str:
    if c not in on_front:
        by = next(o for o in [chosen, *everyone] if o is not c and dominates(o, c))
        worse = [_ratio(c, by, m) for m in (LOSS, SPEED, MEMORY) if compared(by, c, m) > 0]
        return f"dominated by {by.name}: {', '.join(worse)}, and no better beyond noise on the rest."
    signs = {m: compared(chosen, c, m) for m in (LOSS, SPEED, MEMORY)}
    if signs[LOSS] > 0:
        gains = [_ratio(c, chosen, m) for m in (SPEED, MEMORY) if signs[m] < 0]
        return (f"higher held-out loss than {chosen.name} ({_ratio(c, chosen, LOSS)})"
                + (f", though it has {' and '.join(gains)}" if gains else "") + ".")
    if signs[SPEED] > 0:
        return (f"within noise of {chosen.name}'s held-out loss, but slower ({_ratio(c, chosen, SPEED)})"
                + (f", though it needs {_ratio(c, chosen, MEMORY)}" if signs[MEMORY] < 0 else "") + ".")
    if signs[MEMORY] > 0:
        return f"within noise of {chosen.name}'s loss and speed, but larger ({_ratio(c, chosen, MEMORY)})."
    return f"within noise of {chosen.name} on all three."
