"""Where a session's trained state lives, and how it is written, read back and checked.

`State` is what the loop asks: whether a trainable weight went non-finite, a checkpoint written or read, and the
whole trained model for the final save. `LocalState` is a run whose every process holds the whole model (one
process, or data parallel); `adapters.training.sharded.ShardedState` one whose weights, gradients and optimizer
states are spread over the processes (``--sharding fsdp``). The session picks one when it opens, so nothing else
asks which it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import checkpoints
from ..host import distribution_of
from ..loading import BaseModel
from ..store import save
from .health import non_finite
from .in_backward import InBackward
from .model import restore_dtypes
from .prepared import Prepared


class State:
    """What every kind of state shares: the session, and how trained weights are saved."""

    def __init__(self, session: Prepared) -> None:
        self.session = session

    def save_weights(self, model: torch.nn.Module, base: BaseModel, directory: str | Path, **extra: Any) -> Path:
        """``model`` saved as the session's strategy saves it (`adapters.store.save`): the weights and a manifest."""
        run = self.session.run
        return save(model, directory, strategy=run.strategy, config=run.config, base=base,
                    plugin_versions=dict([distribution_of(run.plugin)]), other_base=self.session.built.other_base,
                    **extra)

    def unwrapped(self) -> torch.nn.Module:
        return self.session.unwrapped()

    # What each kind of state does its own way:

    def non_finite_weight(self) -> str | None:
        """The first trainable weight holding a NaN or an infinity, the same answer in every process."""
        raise NotImplementedError

    def save_checkpoint(self, output: str, position: checkpoints.Position, settings: dict[str, Any],
                        keep: int | None) -> Path | None:
        """Write checkpoint ``step-N`` (every process calls it); its path, in the process that wrote it."""
        raise NotImplementedError

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Put a checkpoint's optimizer, schedule and random states into the session (every process)."""
        raise NotImplementedError

    def finish(self) -> None:
        """At the end of a completed run: the trained weights in the dtypes the strategy gave them, where the
        model is whole."""

    def whole(self) -> tuple[torch.nn.Module, BaseModel] | None:
        """The whole trained model and its base, in the dtypes the strategy gave them, in the main process
        (every process calls it); None elsewhere."""
        raise NotImplementedError


class LocalState(State):
    """Every process holds the whole model: the main process writes what it holds."""

    def non_finite_weight(self) -> str | None:
        return non_finite([(n, p) for n, p in self.unwrapped().named_parameters() if p.requires_grad])

    def save_checkpoint(self, output: str, position: checkpoints.Position, settings: dict[str, Any],
                        keep: int | None) -> Path | None:
        accelerator = self.session.accelerator
        accelerator.wait_for_everyone()
        written = None
        if accelerator.is_main_process:
            written = checkpoints.write(
                output, position, settings, lambda d: self.save_weights(self.unwrapped(), self.session.base, d),
                self._save_state, keep)
        accelerator.wait_for_everyone()
        return written

    def _save_state(self, directory: Path) -> None:
        self.session.accelerator.save_state(str(directory))  # the schedule and random states; AdamW's, held by it
        if isinstance(self.session.optimizer, InBackward):  # one per weight, which Accelerate does not hold
            self.session.optimizer.save(directory, self._names())

    def load_checkpoint(self, checkpoint: Path) -> None:
        self.session.accelerator.load_state(str(checkpoint))
        if isinstance(self.session.optimizer, InBackward):
            self.session.optimizer.load(checkpoint, self._names())

    def _names(self) -> dict[torch.nn.Parameter, str]:
        return {p: name for name, p in self.unwrapped().named_parameters()}

    def finish(self) -> None:
        restore_dtypes(self.unwrapped(), self.session.built.dtypes)

    def whole(self) -> tuple[torch.nn.Module, BaseModel] | None:
        self.session.accelerator.wait_for_everyone()
        return (self.unwrapped(), self.session.base) if self.session.accelerator.is_main_process else None
