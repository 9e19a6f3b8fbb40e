"""Periodic checkpoints of a training run, written atomically, and the newest one found for a resume.

``OUTPUT/checkpoints/step-N`` holds everything a resumed run needs to continue exactly:

- ``model/``: the trainable weights as a complete adapters save (the strategy's own format, with a
  manifest), so a checkpoint also loads with ``adapters.load``;
- the optimizer, scheduler and random-number states, written by Accelerate's ``save_state``
  (the frozen base is not: it is loaded again from the model's name);
- ``state.json``: the step, the position in the data and the run's settings.

A checkpoint is written into a hidden temp directory beside it and renamed into place, so a
directory named ``step-N`` is always complete; a half-written one is never picked up.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .errors import AdaptersError
from .files import write_json

if TYPE_CHECKING:
    from .runspec import RunSpec

CHECKPOINTS = "checkpoints"
STATE = "state.json"
MODEL = "model"
_STEP = re.compile(r"step-(\d+)")
# The settings a resumed run may change: where it goes, not what it computes.
RESUMABLE = ("output", "overwrite", "resume", "report_to", "keep_checkpoints", "log_every", "allow_other_base")


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


def write(output: str | Path, position: Position, spec: RunSpec, save_model, save_state, keep: int | None) -> Path:
    """Write ``checkpoints/step-N`` atomically and keep the newest ``keep``; returns its path.

    ``save_model(directory)`` writes the trainable weights (a complete adapters save) and
    ``save_state(directory)`` the optimizer, scheduler and random states.
    """
    root = checkpoints_dir(output)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{position.step}"
    tmp = root / f".step-{position.step}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_state(tmp)
        save_model(tmp / MODEL)
        write_json(tmp / STATE, {"position": msgspec.to_builtins(position), "spec": dataclasses.asdict(spec)})
        if target.exists():  # the same step written again (a resumed run that had got this far)
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in complete(output)[:-keep] if keep else []:
        shutil.rmtree(stale, ignore_errors=True)
    return target


def read(checkpoint: Path) -> tuple[Position, dict[str, Any]]:
    """The position and the recorded settings of a checkpoint."""
    path = checkpoint / STATE
    try:
        state = msgspec.json.decode(path.read_bytes())
        return msgspec.convert(state["position"], Position), dict(state["spec"])
    except (OSError, msgspec.DecodeError, msgspec.ValidationError, KeyError, TypeError) as exc:
        raise AdaptersError(f"{path}: not a readable checkpoint state ({exc}). Resume from an earlier "
                            "checkpoint by removing this one.") from None


def resume_spec(output: str | Path, given: dict[str, Any], options: dict[str, Any]) -> RunSpec:
    """The settings recorded by the newest checkpoint in ``output``, for ``adapters train --resume``.

    A flag given again must agree with what the run used (after defaults and conversions): a
    contradiction names both values. Only where a run goes (`RESUMABLE`) may change.
    """
    from .runspec import RunSpec

    checkpoint = latest_checkpoint(output)
    if checkpoint is None:
        raise AdaptersError(f"--resume {output}: no complete checkpoint in {checkpoints_dir(output)}. Give the "
                            "--output directory of a run that was started with --save-every.")
    _, recorded = read(checkpoint)
    kept = {k: v for k, v in given.items() if k in RESUMABLE}
    asked = {**recorded, **{k: v for k, v in given.items() if k not in RESUMABLE},
             "options": {**recorded.get("options", {}), **options}}
    used, wanted = _resolved(RunSpec(**recorded)), _resolved(RunSpec(**asked))
    for key, value in wanted.items():
        if used.get(key) != value:
            flag = f"--set {key[4:]}={value}" if key.startswith("set ") else f"--{key.replace('_', '-')} {value}"
            had = f"{key[4:]}={used.get(key)}" if key.startswith("set ") else f"{used.get(key)}"
            raise AdaptersError(f"{flag} contradicts the run being resumed, which has {had} "
                                f"({checkpoint / STATE}). Drop the flag, or start a new run.")
    return RunSpec(**{**recorded, **kept, "output": str(output), "resume": True, "overwrite": False})


def _resolved(spec: RunSpec) -> dict[str, Any]:
    """What a run computes with: its settings after the strategy's defaults and the options' types."""
    from .runspec import resolve

    run = resolve(dataclasses.replace(spec, output=None, resume=False, save_every=None), data=False)
    chosen = {"quantization": run.quantization, "task": run.task, "learning_rate": run.learning_rate,
              "lr_scheduler": run.lr_scheduler, "warmup_steps": run.warmup_steps, "weight_decay": run.weight_decay,
              "max_grad_norm": run.max_grad_norm}
    values = {k: v for k, v in dataclasses.asdict(spec).items()
              if k not in (*RESUMABLE, *chosen, "options", "warmup_ratio", "save_every")}
    return {**values, **chosen, **{f"set {k}": v for k, v in dataclasses.asdict(run.config).items()}}
