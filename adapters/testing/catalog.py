"""Every conformance check, in the order a report lists them: those of `adapters.testing.checks` (the strategy
itself, each cell), then those of `adapters.testing.end_to_end` (the whole pipeline)."""
from __future__ import annotations

from . import end_to_end  # noqa: F401  (declares its checks after checks.py's)
from .checks import REGISTRY, Check

CHECKS: dict[str, str] = {c.name: c.doc for c in REGISTRY.values()}  # name -> what passing means
OPTIONAL_CHECKS = frozenset(c.name for c in REGISTRY.values() if c.optional)  # run only when asked
# The checks that run for each declared (task, quantization); the capability matrix is made of them.
CELL_CHECKS = tuple(c.name for c in REGISTRY.values() if c.each == "cell")

__all__ = ["CELL_CHECKS", "CHECKS", "OPTIONAL_CHECKS", "REGISTRY", "Check"]
