"""The training run: resolve the spec -> load base -> apply strategy -> train -> evaluate -> save.

`adapters.runspec.resolve` checks everything a user can get wrong first. The loop is Accelerate's:
prepare, accumulate, backward, clip, step the optimizer and the learning-rate schedule
(``transformers.get_scheduler``). Along the way it logs ``OUTPUT/metrics.jsonl`` and Accelerate's
trackers, evaluates the held-out split every ``eval_every`` steps, and writes a checkpoint every
``save_every`` steps (`adapters.checkpoints`). A first SIGINT or SIGTERM ends the run after the
current step with a checkpoint; a non-finite loss ends it as failed, keeping the last good
checkpoint. Losses stay on the device between logging steps: no host synchronisation per step.

``accelerate launch --multi_gpu -m adapters train`` on GPUs, or ``torchrun --nproc_per_node N -m
adapters train`` on the CPU, runs it data-parallel unchanged: one process saves and reports.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoints
from .errors import AdaptersError, NothingKept
from .host import distribution_of
from .interrupts import graceful_stop
from .loading import BaseModel
from .metrics import METRICS, MetricsLog
from .nn import ParameterCount, count_parameters
from .runspec import Run, RunSpec, resolve
from .store import restore, save
from .training import build, evaluate, load_base, make_accelerator, make_batches, optimized, training_step

# What a run writes into its output besides the final save; kept when the final save replaces it.
RUN_FILES = (checkpoints.CHECKPOINTS, METRICS, "logs")
COMPLETED, INTERRUPTED, FAILED = "completed", "interrupted", "failed"


@dataclass
class TrainResult:
    strategy: str
    model: str
    quantization: str
    task: str
    steps: int  # optimizer steps done, resumed ones included
    parameters: ParameterCount
    before: dict[str, float]
    after: dict[str, float | None]  # held-out metrics at the end; None where not measured
    losses: list[float | None]  # one per optimizer step; None for a loss that was not finite
    tokens_per_s: float
    seconds: float
    output: Path | None  # the final save; None when the run did not complete or had no output
    processes: int = 1  # data-parallel processes (torchrun or accelerate launch)
    main_process: bool = True  # False in the other processes of a data-parallel run
    status: str = COMPLETED  # completed, interrupted or failed
    reason: str | None = None  # why it did not complete
    checkpoints: list[Path] = field(default_factory=list)  # written by this run, oldest first
    resume_command: str | None = None  # how to continue an interrupted run
    trained: torch.nn.Module | None = field(default=None, repr=False)  # the model, still in memory
    base: BaseModel | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """What `adapters train --json` prints."""
        return {
            "status": self.status, "reason": self.reason,
            "strategy": self.strategy, "model": self.model, "quantization": self.quantization,
            "task": self.task, "steps": self.steps,
            "trainable_parameters": self.parameters.trainable, "total_parameters": self.parameters.total,
            "heldout_before": self.before, "heldout_after": self.after,
            "tokens_per_s": round(self.tokens_per_s, 1), "seconds": round(self.seconds, 2),
            "processes": self.processes, "output": str(self.output) if self.output else None,
            "checkpoints": [str(c) for c in self.checkpoints], "resume_command": self.resume_command,
        }


def train(spec: RunSpec, progress: bool = True, stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train a strategy on a base model and data, evaluate it before and after, and save it.

    ``stop(step)``, called after every optimizer step, ends the run there as a signal would: with a
    checkpoint (when the run has an output) and status "interrupted".
    """
    run = resolve(spec)
    s = run.spec
    if s.output and s.overwrite and not s.resume:
        _clear_run_files(Path(s.output))
    accelerator = make_accelerator(s.gradient_accumulation_steps, s.report_to,
                                   Path(s.output) / "logs" if s.output else None)
    resume_from = checkpoints.latest_checkpoint(s.output) if s.resume else None
    position = checkpoints.read(resume_from)[0] if resume_from is not None else None
    base, model = _model(run, accelerator.device, resume_from, position)
    if not s.output:  # said once the model is ready, before the first step
        warnings.warn("no --output, so nothing of this run will be kept: give --output DIR to save the weights, "
                      "checkpoints and metrics.", NothingKept, stacklevel=2)
    loop = _Loop(run, accelerator, base, model)
    if resume_from is not None:
        loop.resume(resume_from, position)
    with graceful_stop(announce=progress and accelerator.is_local_main_process) as request:
        loop.train(lambda step: bool(request) or (stop is not None and stop(step)), progress)
    return loop.finish()


def _clear_run_files(output: Path) -> None:
    """A new run into an existing output (--overwrite): the old run's checkpoints and logs go."""
    for name in RUN_FILES:
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _model(run: Run, device: torch.device, checkpoint: Path | None,
           position: checkpoints.Position | None) -> tuple[BaseModel, torch.nn.Module]:
    """The base and the model to train: freshly applied, or restored from a checkpoint's weights."""
    if checkpoint is None or position is None:
        base, model, _ = build(run, device)
        return base, model
    base = load_base(run, device)
    model = restore(run.strategy, base.model, checkpoint / checkpoints.MODEL, run.config)
    if _trainable(model) != position.trainable:  # e.g. PEFT's prefix with projection saves only what inference uses
        raise AdaptersError(f"{checkpoint}: strategy {run.strategy.name!r} restores other trainable weights than "
                            "the run trained (it saves these options for inference), so this run cannot be resumed. "
                            "Start it again without --resume.")
    return base, model


def _trainable(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters() if p.requires_grad}


class _Loop:
    """One run's state between the steps: what is prepared, where it is, what it logged."""

    def __init__(self, run: Run, accelerator, base: BaseModel, model: torch.nn.Module) -> None:
        from transformers import get_scheduler

        s = self.spec = run.spec
        self.run, self.accelerator, self.base = run, accelerator, base
        self.parameters = count_parameters(model)
        train_set = make_batches(run.dataset.train, base, s.seq_len, "train")
        eval_set = make_batches(run.dataset.heldout, base, s.seq_len, "held-out")
        # Loaders draw their workers' seeds from their own generators, never from the global one that
        # dropout uses, so where a run is resumed does not change its random numbers.
        train_loader = torch.utils.data.DataLoader(train_set, batch_size=s.batch_size, shuffle=True,
                                                   generator=torch.Generator().manual_seed(s.seed))
        eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=s.batch_size,
                                                  generator=torch.Generator().manual_seed(s.seed))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=run.learning_rate, weight_decay=run.weight_decay)
        # Accelerate steps a prepared schedule once per process per optimizer step.
        n = accelerator.num_processes
        # transformers' plain "constant" ignores the warm-up; its "constant_with_warmup" is the same without one.
        name = "constant_with_warmup" if run.lr_scheduler == "constant" else run.lr_scheduler
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=run.warmup_steps * n,
                                  num_training_steps=s.max_steps * n)
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler)
        # Checkpoints hold the trainable weights in the strategy's format, not the frozen base.
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
        self.position = checkpoints.Position(step=0, epoch=0, batch=0, tokens=0, seconds=0.0, losses=[],
                                             trainable=_trainable(model))
        self.before: dict[str, float] = {}
        self.written: list[Path] = []
        self.status, self.reason = COMPLETED, None
        self.metrics = MetricsLog(s.output, accelerator, bool(s.report_to))
        if s.report_to:
            accelerator.init_trackers(f"adapters-{run.strategy.name}", config=_flat(s))

    def resume(self, checkpoint: Path, position: checkpoints.Position) -> None:
        self.accelerator.load_state(str(checkpoint))
        self.position = position
        self.before = position.before

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.eval_loader, self.run.task, self.accelerator, self.spec.eval_batches)

    def train(self, stop: Callable[[int], bool], progress: bool) -> None:
        from tqdm.auto import tqdm

        s, p = self.spec, self.position
        if not self.before:
            self.before = p.before = self.evaluate()
        self.model.train()
        bar = tqdm(total=s.max_steps, initial=p.step, desc=f"train {self.run.strategy.name}", unit="step",
                   disable=not progress or not self.accelerator.is_local_main_process)
        batches = self._batches()
        pending: list[torch.Tensor] = []  # this interval's step losses, on the device
        n = self.accelerator.num_processes
        tokens, grad_norm = torch.tensor(p.tokens // n, device=self.accelerator.device), None
        start = time.perf_counter() - p.seconds
        try:
            while p.step < s.max_steps:
                step_loss = torch.zeros((), device=self.accelerator.device)
                for _ in range(s.gradient_accumulation_steps):
                    batch = next(batches)
                    loss, norm = training_step(self.model, batch, self.optimizer, self.accelerator, p.step + 1,
                                               self.scheduler, self.run.max_grad_norm, check_finite=False)
                    step_loss += loss / s.gradient_accumulation_steps
                    grad_norm = norm if norm is not None else grad_norm
                    tokens += _tokens(batch)
                p.step += 1
                pending.append(step_loss)
                bar.update()
                stopping = stop(p.step) and p.step < s.max_steps
                saving = _due(p.step, s.save_every) or stopping
                if saving or _due(p.step, s.log_every) or _due(p.step, s.eval_every) or p.step == s.max_steps:
                    p.seconds = time.perf_counter() - start
                    if not self._log(pending, tokens, grad_norm, bar):
                        return  # failed: a non-finite loss; the last good checkpoint stays
                    pending = []
                if saving:
                    self._checkpoint()
                if stopping:
                    self.status, self.reason = INTERRUPTED, f"interrupted after step {p.step}"
                    return
        finally:
            bar.close()

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from where the position says, epoch after epoch; the position follows."""
        from accelerate import skip_first_batches

        p = self.position
        while True:
            self.train_loader.set_epoch(p.epoch)
            source = skip_first_batches(self.train_loader, p.batch) if p.batch else self.train_loader
            for batch in source:
                p.batch += 1
                yield batch
            p.epoch, p.batch = p.epoch + 1, 0

    def _log(self, pending: list[torch.Tensor], tokens: torch.Tensor, grad_norm, bar) -> bool:
        """One line of metrics (and an evaluation when due); False when a loss was not finite."""
        p = self.position
        losses = torch.stack(pending).tolist()  # the one host synchronisation of the interval
        p.losses += [v if math.isfinite(v) else None for v in losses]
        p.tokens = int(tokens.item()) * self.accelerator.num_processes
        values = {"loss": losses[-1], "learning_rate": self.scheduler.get_last_lr()[0],
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "tokens_per_s": p.tokens / p.seconds if p.seconds else None}
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:
            what = f"the loss became {losses[bad]} at step {p.step - len(losses) + bad + 1}"
        elif values["grad_norm"] is not None and not math.isfinite(values["grad_norm"]):
            what = f"the gradient norm became {values['grad_norm']} at step {p.step}"
        elif not all(bool(torch.isfinite(w).all()) for w in optimized(self.optimizer)):
            what = f"a trainable weight became non-finite by step {p.step}"
        else:
            what = None
        if what is not None:
            self.status = FAILED
            self.reason = f"{what}; stopped there and kept the last good checkpoint. Lower --learning-rate, or " \
                          "check the data."
            self.metrics.log(p.step, **values, status=FAILED)
            return False
        if _due(p.step, self.spec.eval_every):
            values.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            self.model.train()
        self.metrics.log(p.step, **values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['learning_rate']:.2e}",
                        tok_s=f"{values['tokens_per_s'] or 0:,.0f}")
        return True

    def _checkpoint(self) -> None:
        s, run, accelerator = self.spec, self.run, self.accelerator
        accelerator.wait_for_everyone()
        if not s.output:
            return
        if accelerator.is_main_process:
            def save_model(directory: Path) -> None:
                save(accelerator.unwrap_model(self.model), directory, strategy=run.strategy, config=run.config,
                     base=self.base, plugin_versions=dict([distribution_of(run.plugin)]))

            self.written.append(checkpoints.write(s.output, self.position, s, save_model,
                                                  lambda d: accelerator.save_state(str(d)), s.keep_checkpoints))
        accelerator.wait_for_everyone()

    def finish(self) -> TrainResult:
        s, run, p, accelerator = self.spec, self.run, self.position, self.accelerator
        after: dict[str, float | None] = {k: None for k in self.before}
        output = None
        if self.status == COMPLETED:
            after = self.evaluate()
            output = self._final_save()
        if s.report_to:
            accelerator.end_training()
        resume = f"adapters train --resume {s.output}" if self.status == INTERRUPTED and s.output else None
        return TrainResult(
            run.strategy.name, s.model, run.quantization, run.task, p.step, self.parameters, self.before, after,
            p.losses, p.tokens / p.seconds if p.seconds else 0.0, p.seconds, output,
            accelerator.num_processes, accelerator.is_main_process, self.status, self.reason,
            [c for c in self.written if c.exists()], resume, accelerator.unwrap_model(self.model), self.base)

    def _final_save(self) -> Path | None:
        s, run = self.spec, self.run
        self.accelerator.wait_for_everyone()
        if not s.output or not self.accelerator.is_main_process:
            return None
        training = {**{k: v for k, v in dataclasses.asdict(s).items() if k not in ("output", "overwrite", "resume")},
                    "quantization": run.quantization, "task": run.task, "learning_rate": run.learning_rate,
                    "lr_scheduler": run.lr_scheduler, "warmup_steps": run.warmup_steps}
        # The run made this directory (or was allowed to replace it): replace it, keeping its checkpoints.
        return save(self.accelerator.unwrap_model(self.model), s.output, strategy=run.strategy, config=run.config,
                    base=self.base, overwrite=True, plugin_versions=dict([distribution_of(run.plugin)]),
                    training=training, keep=RUN_FILES)


def _due(step: int, every: int | None) -> bool:
    return every is not None and step % every == 0


def _tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None else batch["input_ids"].numel()


def _flat(spec: RunSpec) -> dict[str, Any]:
    """The spec as trackers take it: scalars only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dataclasses.asdict(spec).items()
            if v is not None}
