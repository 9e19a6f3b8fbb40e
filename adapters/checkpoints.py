"""Periodic checkpoints of a training run, written atomically, and the newest one found for a resume.

``OUTPUT/checkpoints/step-N`` holds everything a resumed run needs to continue exactly:

- ``model/``: the trainable weights as a complete adapters save (the strategy's own format, with a
  manifest), so a checkpoint also loads with ``adapters.load``;
- the optimizer, scheduler and random-number states, written by Accelerate's ``save_state``
  (the frozen base is not: it is loaded again from the model's name);
- ``state.json``: the step, the position in the data and the run's settings.

A checkpoint is written into a hidden temp directory beside it and renamed into place, so a
directory named ``step-N`` is always complete; a half-written one is never picked up.

A run with a final save but no checkpoint (one trained without ``--save-every``, or one made by
``adapters import``) is continued instead (`continue_spec`, `continuing`): from its saved weights,
with a fresh optimizer and learning-rate schedule, for ``--max-steps`` more steps (by default as many
as the run recorded, else `RunSpec`'s default). Its strategy, options, quantization and task stay;
everything else (the data, the learning rate, the batch) may change. The manifest of the save it
ends with records that in ``training["started_from"]``.
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
# compile changes nothing but rounding, so a resumed run may turn it on or off.
RESUMABLE = ("output", "overwrite", "resume", "report_to", "keep_checkpoints", "log_every", "allow_other_base",
             "compile")


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
        if has_final_save(output):
            return continue_spec(output, given, options)
        raise AdaptersError(f"--resume {output}: no complete checkpoint in {checkpoints_dir(output)}, and no final "
                            "save to continue from. Give the --output directory of a run started with --save-every, "
                            "or of a completed run.")
    _, recorded = read(checkpoint)
    kept = {k: v for k, v in given.items() if k in RESUMABLE}
    asked = {**recorded, **{k: v for k, v in given.items() if k not in RESUMABLE},
             "options": {**recorded.get("options", {}), **options}}
    _refuse_contradictions(_resolved(RunSpec(**recorded)), _resolved(RunSpec(**asked)), checkpoint / STATE)
    return RunSpec(**{**recorded, **kept, "output": str(output), "resume": True, "overwrite": False})


def _refuse_contradictions(used: dict[str, Any], wanted: dict[str, Any], where: Path, what: str = "resumed") -> None:
    """A setting in ``wanted`` that differs from ``used`` is an error naming the flag and both values."""
    for key, value in wanted.items():
        if used.get(key) != value:
            flag = f"--set {key[4:]}={value}" if key.startswith("set ") else f"--{key.replace('_', '-')} {value}"
            had = f"{key[4:]}={used.get(key)}" if key.startswith("set ") else f"{used.get(key)}"
            raise AdaptersError(f"{flag} contradicts the run being {what}, which has {had} "
                                f"({where}). Drop the flag, or start a new run.")


# ------------------------------------------------------------------------ continuing from a final save


def has_final_save(output: str | Path) -> bool:
    """Whether ``output`` holds a final save (a manifest) to continue from."""
    from .manifest import MANIFEST

    return (Path(output) / MANIFEST).is_file()


def saved_spec(output: str | Path) -> dict[str, Any]:
    """The `RunSpec` values a final save records: what its weights are (strategy, options, quantization,
    task, base) from the manifest, and the run's other settings where ``adapters train`` recorded them."""
    from .manifest import read_manifest
    from .runspec import RunSpec

    manifest = read_manifest(output)
    training = dict(manifest.training or {})
    fields = {f.name for f in dataclasses.fields(RunSpec)}
    values = {k: v for k, v in training.items() if k in fields and k not in (*RESUMABLE, "save_every")}
    for name in ("batch_size", "gradient_accumulation_steps"):  # as asked, not as out-of-memory back-offs left it
        if isinstance(training.get(f"requested_{name}"), int):
            values[name] = training[f"requested_{name}"]
    if values.get("warmup_ratio") is not None:  # the manifest holds the steps the ratio came to, too
        values.pop("warmup_steps", None)
    local_base = (manifest.local or {}).get("base_path")  # a local base, where it was saved from, if still there
    model = local_base if local_base and Path(local_base).is_dir() else manifest.base_model
    return {**values, "model": model, "strategy": manifest.strategy,
            "quantization": manifest.quantization, "task": manifest.task, "options": dict(manifest.config)}


def continue_spec(output: str | Path, given: dict[str, Any], options: dict[str, Any]) -> RunSpec:
    """``adapters train --resume OUTPUT`` for a run with a final save and no checkpoint: its recorded
    settings, with the flags given. ``--max-steps`` counts the steps to add; the strategy, its options,
    the quantization and the task must agree with the save."""
    from .runspec import RunSpec

    recorded = saved_spec(output)
    asked = {**recorded, **given, "options": {**recorded["options"], **options}}
    if "warmup_steps" in given or "warmup_ratio" in given:  # a warm-up given replaces the recorded one
        asked["warmup_ratio" if "warmup_steps" in given else "warmup_steps"] = None
    spec = RunSpec(**{**asked, "output": str(output), "resume": True, "overwrite": False})
    check_continues(spec, recorded)
    return spec


def check_continues(spec: RunSpec, recorded: dict[str, Any] | None = None) -> None:
    """Refuse continuing the final save in ``spec.output`` with other weights than it holds."""
    from .manifest import MANIFEST
    from .runspec import RunSpec

    recorded = saved_spec(spec.output) if recorded is None else recorded
    where = Path(spec.output) / MANIFEST
    # The strategy first: another one's options are no contradiction of their own, only its consequence.
    _refuse_contradictions({"strategy": _strategy(RunSpec(**recorded))}, {"strategy": _strategy(spec)}, where,
                           "continued")
    _refuse_contradictions(_weights(RunSpec(**recorded)), _weights(spec), where, "continued")


def _strategy(spec: RunSpec) -> str:
    from .host import get_registry
    from .runspec import split_strategy

    return get_registry().entry(split_strategy(spec.strategy, spec.quantization)[0]).strategy.name


def _weights(spec: RunSpec) -> dict[str, Any]:
    """What decides the weights a run trains: the strategy, its options, the quantization and the task."""
    from .runspec import resolve

    run = resolve(dataclasses.replace(spec, output=None, resume=False, save_every=None), data=False)
    return {"strategy": run.strategy.name, "quantization": run.quantization, "task": run.task,
            **{f"set {k}": v for k, v in dataclasses.asdict(run.config).items()}}


def continuing(spec: RunSpec) -> tuple[RunSpec, dict[str, Any] | None]:
    """For a resume of a run with a final save and no checkpoint: the spec to train (a new run into the
    same output, which its final save replaces) and what it starts from; otherwise ``spec`` and None."""
    from .manifest import read_manifest

    if not (spec.resume and spec.output and latest_checkpoint(spec.output) is None and has_final_save(spec.output)):
        return spec, None
    check_continues(spec)
    training = read_manifest(spec.output).training or {}
    earlier = (training.get("started_from") or {}).get("steps_before", 0)
    steps = training.get("max_steps")
    before = earlier + steps if isinstance(earlier, int) and isinstance(steps, int) else None
    started = {"run": str(spec.output), "from": "final save", "steps_before": before, "optimizer": "fresh"}
    return dataclasses.replace(spec, resume=False, overwrite=True), started


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
