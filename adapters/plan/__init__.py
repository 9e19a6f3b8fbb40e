"""Predict a training step's peak memory from a model's config alone, before any run.

The pipeline mirrors a real step: `model_shape` builds the model's skeleton on the meta device (no
weights, no allocation, seconds even for 70B; `skeleton`); each strategy's ``estimate_memory`` hook
says what it trains and what its own modules keep for backward (`StrategyMemory`); `estimate` adds
the base's part (`weights`, `activations`) and takes the largest of the step's phases (`memory`), for one
process of a run of several when `RunShape.processes` says so (data parallel or FSDP2: `processes`);
`with_budget` adds the fit and the largest batch and sequence under a budget (`budget`);
`make_plans` does all of it for the strategies a user asks for (`plans`).

Its CPU totals are checked against profiler peaks (tests/test_plan.py). Architectures it does not
model get no estimate, never a guess.
"""
from ..contract import GRADIENT_FLOWS, LinearShape, ModelShape, RunShape, StrategyMemory
from ..text import format_bytes, parse_size  # bench imports them from here
from .activations import layer_activations
from .budget import largest_that_fits, with_budget
from .memory import COMPONENTS, RUNTIME_OVERHEAD, STATIC_COMPONENTS, Plan, estimate, peak, strategy_memory
from .plans import PlanSettings, make_plans
from .skeleton import model_shape, run_shape
from .weights import base_weights

__all__ = [
    "GRADIENT_FLOWS", "LinearShape", "ModelShape", "RunShape", "StrategyMemory", "format_bytes", "parse_size",
    "layer_activations", "largest_that_fits", "with_budget", "COMPONENTS", "RUNTIME_OVERHEAD", "STATIC_COMPONENTS",
    "Plan", "estimate", "peak", "strategy_memory", "PlanSettings", "make_plans", "model_shape", "base_weights",
]
