"""Continuing a run, the rule written once: from its newest checkpoint exactly, or from its final save.

`resume_spec` is what ``adapters train --resume OUTPUT`` builds: the settings the run recorded, with the flags
given. `start` is what `adapters.train` does with any spec before it loads anything, and resolves it once:

- a spec without ``resume``: a new run, nothing to continue;
- a checkpoint in the output: the run continues exactly where it stopped. What it computes must stay as it was:
  a flag that contradicts the recorded settings is an error naming both values; only where a run goes
  (`RESUMABLE`) may change;
- no checkpoint, but a final save (a run trained without ``--save-every``, or one made by ``adapters import``):
  the run continues from the saved weights with a fresh optimizer and learning-rate schedule, for ``--max-steps``
  more steps (by default as many as the run recorded). Its strategy, options, quantization and task stay;
  everything else (the data, the learning rate, the batch) may change. The manifest of the save it ends with
  records that in ``training["started_from"]``;
- neither: an error, before anything loads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoints import STATE, Position, checkpoints_dir, latest_checkpoint, read
from .errors import AdaptersError
from .manifest import MANIFEST, read_manifest
from .resolver import resolve
from .runspec import Run, RunSpec, split_strategy

# The settings a resumed run may change: where it goes, not what it computes.
# compile changes nothing but rounding, so a resumed run may turn it on or off.
RESUMABLE = ("output", "overwrite", "resume", "report_to", "keep_checkpoints", "log_every", "allow_other_base",
             "compile")
# Settings compared as what resolving made of them (Run.chosen) rather than as given.
_AS_CHOSEN = ("options", "warmup_ratio", "save_every", "quantization", "task", "learning_rate", "lr_scheduler",
              "warmup_steps", "weight_decay", "max_grad_norm")


@dataclass
class Start:
    """A run about to train, and what it continues from, if anything."""

    run: Run
    checkpoint: Path | None = None  # continues exactly from this checkpoint ...
    position: Position | None = None  # ... at this position
    saved: Path | None = None  # continues from the final save in this output, with a fresh optimizer
    started_from: dict[str, Any] | None = None  # what the manifest records of that


def resume_spec(output: str | Path, given: dict[str, Any], options: dict[str, Any]) -> RunSpec:
    """The settings the run in ``output`` recorded (its newest checkpoint's, else its final save's), with the flags
    ``given`` and the strategy ``options``, as a spec that resumes it; `start` checks what they may change."""
    checkpoint = latest_checkpoint(output)
    if checkpoint is not None:
        recorded = read(checkpoint)[1]
    elif has_final_save(output):
        recorded = saved_spec(output)
        if "warmup_steps" in given or "warmup_ratio" in given:  # a warm-up given replaces the recorded one
            recorded["warmup_ratio" if "warmup_steps" in given else "warmup_steps"] = None
    else:
        raise _nothing_to_resume(output)
    values = {**recorded, **given, "options": {**recorded.get("options", {}), **options}}
    return RunSpec(**{**values, "output": str(output), "resume": True, "overwrite": False})


def start(spec: RunSpec) -> Start:
    """The run ``spec`` asks for, resolved once, and where it continues from (see the module's docstring)."""
    if not spec.resume:
        return Start(resolve(spec))
    if not spec.output:
        raise AdaptersError("--resume needs the run's --output directory: give --resume OUTPUT.")
    checkpoint = latest_checkpoint(spec.output)
    if checkpoint is not None:
        position, recorded, chosen = read(checkpoint)
        run = resolve(spec)
        if chosen is None:  # a checkpoint written before the run's choices were recorded: resolve them again
            chosen = resolve(dataclasses.replace(RunSpec(**recorded), output=None, resume=False, save_every=None),
                             data=False).chosen()
        # A setting added since the checkpoint was written is at its default there (RunSpec's).
        _refuse_contradictions(_computed(dataclasses.asdict(RunSpec(**recorded)), chosen),
                               _computed(dataclasses.asdict(run.spec), run.chosen()),
                               checkpoint / STATE, "resumed")
        return Start(run, checkpoint=checkpoint, position=position)
    if not has_final_save(spec.output):
        raise _nothing_to_resume(spec.output)
    manifest = read_manifest(spec.output)
    where = Path(spec.output) / MANIFEST
    # The strategy first, before its options are read: another one's are no contradiction of their own.
    _refuse_contradictions({"strategy": manifest.strategy}, {"strategy": _strategy_name(spec)}, where, "continued")
    # A new run into the same output, which its final save replaces (keeping the run's checkpoints and logs).
    run = resolve(dataclasses.replace(spec, resume=False, overwrite=True))
    saved = {"quantization": manifest.quantization, "task": manifest.task,
             **{f"set {k}": v for k, v in manifest.config.items()}}
    _refuse_contradictions(saved, {k: _weights(run)[k] for k in saved}, where, "continued")
    training = manifest.training or {}
    earlier = (training.get("started_from") or {}).get("steps_before", 0)
    steps = training.get("max_steps")
    before = earlier + steps if isinstance(earlier, int) and isinstance(steps, int) else None
    started = {"run": str(spec.output), "from": "final save", "steps_before": before, "optimizer": "fresh"}
    return Start(run, saved=Path(spec.output), started_from=started)


def _strategy_name(spec: RunSpec) -> str:
    """The registered name of the strategy ``spec`` asks for (an alias gives the strategy's own name)."""
    from .host import get_registry

    return get_registry().entry(split_strategy(spec.strategy, spec.quantization)[0]).strategy.name


def _nothing_to_resume(output: str | Path) -> AdaptersError:
    return AdaptersError(f"--resume {output}: no complete checkpoint in {checkpoints_dir(output)}, and no final save "
                         "to continue from. Give the --output directory of a run started with --save-every, or of a "
                         "completed run.")


def _weights(run: Run) -> dict[str, Any]:
    """What decides the weights a run trains: its quantization, task and the strategy's options."""
    return {"quantization": run.quantization, "task": run.task,
            **{f"set {k}": v for k, v in dataclasses.asdict(run.config).items()}}


def _computed(spec: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    """What a run computes with: its settings but where it goes, with what resolving chose for them."""
    values = {k: v for k, v in spec.items() if k not in (*RESUMABLE, *_AS_CHOSEN)}
    options = chosen.get("options", {})
    return {**values, **{k: v for k, v in chosen.items() if k != "options"},
            **{f"set {k}": v for k, v in options.items()}}


def _refuse_contradictions(used: dict[str, Any], wanted: dict[str, Any], where: Path, what: str) -> None:
    """A setting in ``wanted`` that differs from ``used`` is an error naming the flag and both values."""
    for key, value in wanted.items():
        if used.get(key) != value:
            flag = f"--set {key[4:]}={value}" if key.startswith("set ") else f"--{key.replace('_', '-')} {value}"
            had = f"{key[4:]}={used.get(key)}" if key.startswith("set ") else f"{used.get(key)}"
            raise AdaptersError(f"{flag} contradicts the run being {what}, which has {had} "
                                f"({where}). Drop the flag, or start a new run.")


def has_final_save(output: str | Path) -> bool:
    """Whether ``output`` holds a final save (a manifest) to continue from."""
    return (Path(output) / MANIFEST).is_file()


def saved_spec(output: str | Path) -> dict[str, Any]:
    """The `RunSpec` values a final save records: what its weights are (strategy, options, quantization,
    task, base) from the manifest, and the run's other settings where ``adapters train`` recorded them."""
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
