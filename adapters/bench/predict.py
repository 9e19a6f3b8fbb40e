"""The plan's prediction beside a measurement: the same run, estimated from the config alone."""
from __future__ import annotations

from typing import Any

import msgspec

from ..reports.model import OkResult, Prediction
from ..runspec import RunSpec
from .provenance import device_kind


def predict(spec: RunSpec, result: OkResult, shapes: dict[str, Any] | None = None) -> Prediction:
    """The plan's prediction for the measured ``result`` of ``spec``, split as the measurement is, with
    errors in percent; a plan that fails is recorded in it, never raised.

    ``shapes`` caches the model's skeleton per task across calls.
    """
    from ..host import get_registry
    from ..options import build_config
    from ..plan import estimate, model_shape, run_shape

    shapes = {} if shapes is None else shapes
    task, device = result.task, device_kind()
    try:
        if task not in shapes:
            shapes[task] = model_shape(spec.model, task, device)
        strategy = get_registry().get(result.name)
        config = build_config(strategy.config_class, spec.options, strategy.name)
        run = run_shape(spec, task, result.quantization, device, processes=result.processes or 1)
        plan = estimate(shapes[task], strategy, config, run, result.strategy)
    except Exception as exc:  # the measurement stands; a failing plan is recorded, not fatal
        return Prediction(status="no estimate", message=f"planning failed: {type(exc).__name__}: {exc}")
    if plan.status != "ok":
        return Prediction(status=plan.status, message=plan.message)
    predicted = plan.measured_convention()
    measured = msgspec.structs.asdict(result.memory.components)
    errors = {k: _error_pct(predicted[k], measured[k]) for k in predicted}
    errors["total"] = _error_pct(plan.peak_bytes, result.memory.peak_bytes)
    return Prediction(status="ok", message=None, peak_bytes=plan.peak_bytes, phase=plan.peak_phase,
                      components=predicted, error_pct=errors)


def predicted_largest(spec: RunSpec, parameter: str, limit: int | None) -> int | None:
    """The largest ``parameter`` ("batch_size" or "seq_len") that `adapters plan` predicts fits under
    ``limit`` (on a GPU, its memory when None); None on the CPU without a limit."""
    import torch

    from ..plan import PlanSettings, make_plans

    if limit is None and torch.cuda.is_available():
        limit = torch.cuda.get_device_properties(0).total_memory
    if limit is None:
        return None
    (plan,) = make_plans(PlanSettings(spec, strategies=[spec.strategy], device=device_kind(),
                                      budget=str(limit)))["plans"]
    return plan["max_batch_size"] if parameter == "batch_size" else plan["max_seq_len"]


def _error_pct(predicted: int, measured: int) -> float | None:
    if measured == 0:
        return 0.0 if predicted == 0 else None
    return round(100 * (predicted - measured) / measured, 2)
