"""Whether a run is still healthy: every loss, the gradient norm, every trainable weight and every held-out metric
finite.

The loop asks at each logging interval (`Health.interval`: one host synchronisation for the interval's losses,
one for the weights) and at the end (`Health.weights`, `non_finite_metric`); bench and the kit ask of each loss
they read anyway (`finite_loss`). A loss, norm, weight or metric that is not finite ends the run as failed,
naming what and where; the loop then saves nothing, and its last good checkpoint and any earlier save stay.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import TrainingFailed


class Health:
    """The checks of one session; ``non_finite_weight()`` names a trainable weight that is not finite (its state
    knows where they are: `adapters.training.state.State.non_finite_weight`)."""

    def __init__(self, non_finite_weight: Callable[[], str | None]) -> None:
        self.non_finite_weight = non_finite_weight

    def interval(self, losses: list[float], grad_norm: float | None, step: int) -> str | None:
        """What went wrong in the logging interval that ended at ``step`` (its ``losses``), or None."""
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:
            return f"the loss became {losses[bad]} at step {step - len(losses) + bad + 1}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"the gradient norm became {grad_norm} at step {step}"
        if (name := self.non_finite_weight()) is not None:
            return f"the trainable weight {name} became non-finite by step {step}"
        return None

    def weights(self, step: int) -> str | None:
        """A trainable weight that is not finite at the end, after ``step``, or None."""
        name = self.non_finite_weight()
        return None if name is None else f"the trainable weight {name} is not finite at the end, after step {step}"


def non_finite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None (one host synchronisation)."""
    if not named:
        return None
    finite = [torch.isfinite(t).all() for _, t in named]
    finite = torch.stack([f.to(finite[0].device) for f in finite])
    return None if bool(finite.all()) else named[int((~finite).nonzero()[0])][0]


def non_finite_metric(values: dict[str, Any], prefix: str, where: str) -> str | None:
    """What held-out metric in ``values`` (named ``prefix``...) is not finite, said with ``where``."""
    bad = next(((k, v) for k, v in values.items()
                if k.startswith(prefix) and isinstance(v, float) and not math.isfinite(v)), None)
    return None if bad is None else f"the held-out {bad[0].removeprefix(prefix)} became {bad[1]} {where}"


def finite_loss(loss: float, step: int) -> float:
    """``loss`` when it is finite; `TrainingFailed` naming the step when it is not."""
    if not math.isfinite(loss):
        raise TrainingFailed(f"loss became {loss} at step {step}; stopped and saved nothing. Lower --learning-rate, "
                             "or check the data.")
    return loss
