"""Periodic checkpoints of a training run, written atomically, and the newest one found for a resume.

``OUTPUT/checkpoints/step-N`` holds everything a resumed run needs to continue exactly:

- ``model/``: the trainable weights as a complete adapters save (the strategy's own format, with a
  manifest), so a checkpoint also loads with ``adapters.load``;
- the optimizer, scheduler and random-number states, written by Accelerate's ``save_state``
  (the frozen base is not: it is loaded again from the model's name); an optimizer Accelerate does not hold (a
  sharded run's, one per weight in backward) as ``optimizer.safetensors`` and ``optimizer.json``;
- ``state.json``: the step, the position in the data, the run's settings (``spec``) and what resolving them
  decided (``run``: quantization, task, optimization, the strategy's options).

A checkpoint is written into a hidden temp directory beside it and renamed into place, so a
directory named ``step-N`` is always complete; a half-written one is never picked up.

This is the format alone; what a resumed run may change, and continuing from a final save, are
`adapters.resuming`'s.
"""
from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import msgspec

from .errors import AdaptersError
from .files import write_json

CHECKPOINTS = "checkpoints"
STATE = "state.json"
MODEL = "model"
# An optimizer's state where Accelerate does not write it (sharded runs, the optimizer in backward): its tensors by
# weight name ("NAME::STATE", e.g. "model.norm.weight::exp_avg"), and the rest as JSON.
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"
STATE_SEPARATOR = "::"
_STEP = re.compile(r"step-(\d+)")


class Position(msgspec.Struct):
    """Where a run is: optimizer steps done, and the micro-batches it consumed of the current epoch."""

    step: int
    epoch: int
    batch: int  # micro-batches of `epoch` already consumed
    tokens: int
    seconds: float
    losses: list[float | None]
    before: dict[str, float | None] = msgspec.field(default_factory=dict)  # held-out metrics at step 0
    trainable: dict[str, list[int]] = msgspec.field(default_factory=dict)  # name -> shape, as the optimizer holds them
    micro_batch: int | None = None  # rows per forward after out-of-memory back-offs; None: the whole batch
    backoffs: list[dict[str, Any]] = msgspec.field(default_factory=list)  # those back-offs, in order
    started_from: dict[str, Any] | None = None  # a run continued from a final save: which, and its steps before

    @classmethod
    def start(cls, trainable: dict[str, list[int]] | None = None) -> Position:
        """Before the first step."""
        return cls(step=0, epoch=0, batch=0, tokens=0, seconds=0.0, losses=[], trainable=trainable or {})


def checkpoints_dir(output: str | Path) -> Path:
    return Path(output) / CHECKPOINTS


def complete(output: str | Path) -> list[Path]:
    """The complete checkpoints in ``output``, oldest first."""
    root = checkpoints_dir(output)
    if not root.is_dir():
        return []
    # A symbolic link is never a checkpoint: it could point out of the output directory.
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP.fullmatch(p.name)) and not p.is_symlink() and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output``, or None."""
    found = complete(output)
    return found[-1] if found else None


def write(output: str | Path, position: Position, settings: dict[str, Any], save_model, save_state,
          keep: int | None) -> Path:
    """Write ``checkpoints/step-N`` atomically and keep the newest ``keep``; returns its path.

    ``settings`` is ``{"spec": ..., "run": ...}`` (see the module's docstring); ``save_model(directory)`` writes
    the trainable weights (a complete adapters save) and ``save_state(directory)`` the optimizer, scheduler and
    random states.
    """
    root = checkpoints_dir(output)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{position.step}"
    tmp = root / f".step-{position.step}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_state(tmp)
        save_model(tmp / MODEL)
        write_json(tmp / STATE, {"position": msgspec.to_builtins(position), **settings})
        if target.exists():  # the same step written again (a resumed run that had got this far)
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in complete(output)[:-keep] if keep else []:
        shutil.rmtree(stale, ignore_errors=True)
    return target


def read(checkpoint: Path) -> tuple[Position, dict[str, Any], dict[str, Any] | None]:
    """The position, the recorded spec and what resolving it decided (None in checkpoints before 0.3)."""
    path = checkpoint / STATE
    try:
        state = msgspec.json.decode(path.read_bytes())
        run = state.get("run")
        return msgspec.convert(state["position"], Position), dict(state["spec"]), None if run is None else dict(run)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError, KeyError, TypeError) as exc:
        raise AdaptersError(f"{path}: not a readable checkpoint state ({exc}). Resume from an earlier "
                            "checkpoint by removing this one.") from None
