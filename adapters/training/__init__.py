"""Training: one session set up once (`Session`), the loop that trains it (`train`), and their parts.

- `session`: `Session.open` sets a run up (accelerator, base and strategy, data and loaders, compile, optimizer,
  schedule); train, bench and the conformance kit all step through it.
- `model`: the base loaded for training and the strategy applied or restored, in its precision.
- `step`: one optimizer step, and the `Stepper` with its out-of-memory back-off.
- `health`: the non-finite checks. `state`, `sharded`: checkpoints and the whole model, local or sharded.
- `loop`: `train`, the loop itself; `result`: `TrainResult` and what a save records of the run.
"""
from __future__ import annotations

from ..batches import make_batches
from .evaluate import evaluate
from .health import finite_loss
from .loop import train
from .model import (
    Built,
    apply_strategy,
    build,
    enable_gradient_checkpointing,
    keep_float32_trainable,
    load_base,
    restore_dtypes,
    trainable_dtypes,
)
from .result import COMPLETED, FAILED, INTERRUPTED, TrainResult
from .session import Session, make_accelerator, tokens_of
from .step import Stepper, is_out_of_memory, optimizer_step, split_batch

__all__ = ["COMPLETED", "FAILED", "INTERRUPTED", "Built", "Session", "Stepper", "TrainResult", "apply_strategy",
           "build", "enable_gradient_checkpointing", "evaluate", "finite_loss", "is_out_of_memory",
           "keep_float32_trainable", "load_base", "make_accelerator", "make_batches", "optimizer_step",
           "restore_dtypes", "split_batch", "tokens_of", "train", "trainable_dtypes"]
