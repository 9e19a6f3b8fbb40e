"""A plan against a memory budget: whether it fits, and the largest batch and sequence that do."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..contract import ModelShape, RunShape, Strategy
from .memory import Plan, peak, strategy_memory


def largest_that_fits(fits: Callable[[int], bool], upper: int) -> int | None:
    """The largest n in [1, upper] with fits(n), for a monotone fits; None if not even 1 fits.

    Doubles from 1 to the first n that does not fit, then bisects."""
    if not fits(1):
        return None
    lo, hi = 1, 2
    while hi <= upper and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, upper + 1)
    while hi - lo > 1:  # fits(lo) and (hi > upper or not fits(hi))
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def with_budget(plan: Plan, shape: ModelShape, strategy: Strategy, config: Any, run: RunShape, budget: int) -> Plan:
    """Add the fit verdict and the largest batch size and sequence length under ``budget``."""
    if plan.status != "ok":
        return plan
    plan.budget_bytes = budget
    plan.fits = plan.peak_bytes <= budget

    def fits(**changes: int) -> bool:
        r = dataclasses.replace(run, **changes)
        return sum(peak(shape, r, strategy_memory(strategy, shape, config, r))[0].values()) <= budget

    max_positions = getattr(shape.config, "max_position_embeddings", None) or 2**20
    plan.max_batch_size = largest_that_fits(lambda b: fits(batch_size=b), 2**16)
    plan.max_seq_len = largest_that_fits(lambda t: fits(seq_len=t), max_positions)
    return plan
