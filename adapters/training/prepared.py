"""What Accelerate prepared for a run: the part of a `adapters.training.Session` that its parts work on.

The stepper steps it, the state writes and reads it back; the session (a `Prepared` with its loaders and those
parts) puts it together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..loading import BaseModel
from ..runspec import Run
from .model import Built


@dataclass
class Prepared:
    """A run, and its model, optimizer and schedule as Accelerate prepared them."""

    run: Run
    accelerator: Any
    built: Built
    model: torch.nn.Module  # as Accelerate prepared it (wrapped for data parallelism, sharded under FSDP)
    optimizer: Any
    scheduler: Any
    compiled: dict[str, Any]  # {"on", "layers", "error"}: whether the decoder layers run compiled, as they do now

    @property
    def base(self) -> BaseModel:
        return self.built.base

    def unwrapped(self) -> torch.nn.Module:
        """The model without Accelerate's wrapper (DDP's), as the strategy left it."""
        return self.accelerator.unwrap_model(self.model)
