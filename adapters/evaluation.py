"""Score a saved run, or a merged checkpoint, on held-out data: ``adapters eval``.

What can be scored (`inspect`, `open_run`; `adapters generate` opens them the same way):

- a run: a directory saved by ``adapters train`` (or ``adapters import``), with its ``adapters.json``;
  it loads onto its base with `adapters.load`;
- a checkpoint: a plain transformers folder (``config.json`` and weights), e.g. one written by
  ``adapters merge``; it loads as a base model, for the task its config names.

`evaluate_run` scores it with what training uses (`adapters.data.load_dataset`,
`adapters.batches.make_batches` and `adapters.training.evaluate`), on the settings the run
recorded: the same data, sequence length, batch size and number of held-out batches, so that a
run's score equals the "after" of its ``adapters train`` summary. Every one of them can be given
instead. A merged checkpoint takes its run's where its merge record holds them (``merged_from.training``);
any other checkpoint, which records none, takes `RunSpec`'s defaults.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdaptersError
from .manifest import MANIFEST, Manifest, read_manifest
from .metrics import clean
from .runspec import RunSpec

RUN, CHECKPOINT = "run", "checkpoint"
MERGED = "merged-checkpoint"  # the ``kind`` of the record `adapters merge` writes beside a checkpoint
SPLITS = ("held-out", "all")


@dataclass
class RunInfo:
    """What a directory to use is, read without loading any weight."""

    path: Path
    kind: str  # RUN or CHECKPOINT
    task: str
    labels: list[str] = field(default_factory=list)
    manifest: Manifest | None = None  # a run's
    base_model: str | None = None  # the base a run was trained on (or a checkpoint says it was merged into)
    quantization: str = "none"  # that base's, as the run trained on it
    merged_from: dict[str, Any] | None = None  # a merged checkpoint's record of its run

    @property
    def strategy(self) -> str | None:
        return self.manifest.strategy if self.manifest is not None else None

    @property
    def training(self) -> dict[str, Any]:
        """The settings the run was trained with (for a merged checkpoint, its run's, where its record holds
        them); empty for a run trained elsewhere or a checkpoint without them."""
        if self.manifest is not None:
            return dict(self.manifest.training or {})
        training = (self.merged_from or {}).get("training")
        return dict(training) if isinstance(training, dict) else {}

    def describe(self) -> str:
        """``lora on smollm2-135m`` or ``checkpoint``, for headers."""
        if self.kind == CHECKPOINT:
            return "merged checkpoint" if self.base_model else "checkpoint"
        return f"{self.strategy} on {self.base_model}"


@dataclass
class Opened:
    """A run or a checkpoint, loaded and ready to use."""

    info: RunInfo
    model: Any  # torch.nn.Module: the run's model (its strategy applied) or the checkpoint's
    base: Any  # the BaseModel it was loaded with; for a checkpoint, the checkpoint itself

    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer


def inspect_run(path: str | Path) -> RunInfo:
    """What ``path`` holds, a run or a checkpoint, and its task, without loading weights."""
    from .store import _saved_base

    path = Path(path)
    if not path.is_dir():
        raise AdaptersError(f"{path}: not a directory. Give the --output directory of a training run, or a "
                            "merged checkpoint (a folder with config.json).")
    if (path / "config.json").is_file():
        return _inspect_checkpoint(path)
    manifest = read_manifest(path)
    return RunInfo(path, RUN, manifest.task, [str(label) for label in manifest.labels or []], manifest,
                   _saved_base(manifest), manifest.quantization)


def _inspect_checkpoint(path: Path) -> RunInfo:
    from .models import resolve_model

    task = resolve_model(str(path)).default_task
    labels: list[str] = []
    if task == "sequence-classification":
        config = json.loads((path / "config.json").read_text())
        id2label = config.get("id2label") if isinstance(config, dict) else None
        if isinstance(id2label, dict) and id2label:
            labels = [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k) if str(k).isdigit() else 0)]
    source = _merged_from(path)
    base = source.get("base_model") if source else None
    quantization = source.get("quantization") if source else None
    return RunInfo(path, CHECKPOINT, task, labels, None, base if isinstance(base, str) else None,
                   quantization if isinstance(quantization, str) else "none", source)


def _merged_from(path: Path) -> dict[str, Any] | None:
    """What a merged checkpoint's record (the ``adapters.json`` that ``adapters merge`` writes, read as
    plain JSON) says of its run: its base, quantization and, where recorded, training settings."""
    try:
        record = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    source = record.get("merged_from") if isinstance(record, dict) and record.get("kind") == MERGED else None
    return source if isinstance(source, dict) else None


def open_run(path: str | Path | RunInfo, device: Any = None, allow_other_base: bool = False) -> Opened:
    """Load a run onto its base (`adapters.load`), or a checkpoint as a base model, in eval mode."""
    from .loading import load_base_model
    from .store import load

    info = path if isinstance(path, RunInfo) else inspect_run(path)
    if info.kind == RUN:
        loaded = load(info.path, device=device, allow_other_base=allow_other_base)
        model, base = loaded.model, loaded.base
    else:
        base = load_base_model(str(info.path), task=info.task, labels=info.labels or None, device=device)
        model = base.model
    model.eval()
    return Opened(info, model, base)


# ------------------------------------------------------------------------------------------------ eval


def evaluate_run(
    run: str | Path | Opened,
    data: str | None = None,
    *,
    batches: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    split: str = "held-out",
    device: Any = None,
) -> dict[str, Any]:
    """The held-out loss and perplexity (causal-lm), or loss and accuracy (classification), of a run or
    a checkpoint, with the settings it was trained with unless given; strict JSON (None where not measured).

    ``data`` is a data file (as ``adapters train --data`` takes); None means the run's own data, or the
    built-in data for the task. ``split`` is ``"held-out"`` (the part training never sees) or ``"all"``
    (every example: for a file kept apart for evaluation). ``batches`` of ``batch_size`` rows are
    scored, in order; 0 measures nothing.
    """
    import torch

    from . import data as datasets
    from .training import evaluate, make_accelerator, make_batches

    if split not in SPLITS:
        raise AdaptersError(f"--split {split}: use one of {', '.join(SPLITS)}.")
    info = run.info if isinstance(run, Opened) else inspect_run(run)
    recorded = info.training
    settings = {
        "data": data if data is not None else recorded.get("data"),
        "batches": _chosen(batches, recorded.get("eval_batches"), RunSpec.eval_batches, "batches", 0),
        "batch_size": _chosen(batch_size, recorded.get("requested_batch_size", recorded.get("batch_size")),
                              RunSpec.batch_size, "batch-size", 1),
        "seq_len": _chosen(seq_len, recorded.get("seq_len"), RunSpec.seq_len, "seq-len", 1),
        "seed": recorded.get("seed", RunSpec.seed),
    }
    dataset = datasets.load_dataset(settings["data"], info.task)  # before the weights: a bad file fails fast
    opened = run if isinstance(run, Opened) else open_run(info, device)
    examples = dataset.heldout if split == "held-out" else [*dataset.train, *dataset.heldout]
    what = "held-out" if split == "held-out" else "evaluation"
    accelerator = make_accelerator()
    # As the training loop builds its held-out loader, so that the numbers agree with its "after".
    rows = make_batches(examples, opened.base, settings["seq_len"], what)
    loader = torch.utils.data.DataLoader(rows, batch_size=settings["batch_size"],
                                         collate_fn=getattr(rows, "collate", None),
                                         generator=torch.Generator().manual_seed(settings["seed"]))
    model, loader = accelerator.prepare(opened.model, loader)
    metrics = evaluate(model, loader, info.task, accelerator, settings["batches"])
    return {
        "run": str(info.path), "kind": info.kind, "strategy": info.strategy, "model": info.base_model,
        "task": info.task, "data": dataset.name, "split": split, "examples": len(examples),
        "batches": settings["batches"], "batch_size": settings["batch_size"], "seq_len": settings["seq_len"],
        **clean(metrics)[0],
    }


def _chosen(given: int | None, recorded: Any, default: int, flag: str, minimum: int) -> int:
    value = given if given is not None else recorded if isinstance(recorded, int) else default
    if value < minimum:
        raise AdaptersError(f"--{flag} must be at least {minimum}, not {value}.")
    return value
