"""The training run: resolve -> open a session -> step until done, logging, checking and checkpointing -> evaluate
-> save.

`adapters.resuming.start` resolves the spec and finds what a resumed run continues from, before anything loads.
The loop logs ``OUTPUT/metrics.jsonl`` and Accelerate's trackers every ``log_every`` steps (losses stay on the
device in between: no host synchronisation per step), evaluates the held-out split every ``eval_every`` steps, and
writes a checkpoint every ``save_every`` steps (`adapters.checkpoints`). A first SIGINT or SIGTERM ends the run
after the current step with a checkpoint; with several processes they agree on it first, so that all stop after
the same step.

A run ends as failed, naming what and where, and saves nothing (its last good checkpoint and any earlier save in
its output stay) when something stops being finite (`adapters.training.health`) or when even a micro-batch of 1
runs out of memory (`adapters.training.step`). A metric that was not measured (``eval_batches`` 0) is None, never
0.

``accelerate launch --multi_gpu -m adapters train`` on GPUs, or ``torchrun --nproc_per_node N -m adapters train`` on
the CPU, runs it data-parallel (or sharded, with ``--sharding fsdp``) unchanged: one process saves and reports.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoints, engine, resuming
from ..errors import NothingKept
from ..interrupts import graceful_stop
from ..manifest import RUN_ENTRIES
from ..metrics import MetricsLog, clean
from ..runspec import RunSpec
from .health import non_finite_metric
from .result import COMPLETED, FAILED, INTERRUPTED, TrainResult, engine_now, training_record
from .session import Session, make_accelerator, tokens_of


def train(spec: RunSpec, progress: bool = True, stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train a strategy on a base model and data, evaluate it before and after, and save it.

    ``stop(step)``, called after every optimizer step, ends the run there as a signal would: with a
    checkpoint (when the run has an output) and status "interrupted".
    """
    begun = resuming.start(spec)
    s = begun.run.spec
    if s.output and s.overwrite and begun.saved is None and not spec.resume:
        _clear_run_files(Path(s.output))
    accelerator = make_accelerator(s.report_to, Path(s.output) / "logs" if s.output else None, s.sharding,
                                   s.mixed_precision)
    session = Session.open(begun.run, accelerator=accelerator, checkpoint=begun.checkpoint, saved=begun.saved)
    if not s.output:  # said once the model is ready, before the first step
        warnings.warn("no --output, so nothing of this run will be kept: give --output DIR to save the weights, "
                      "checkpoints and metrics.", NothingKept, stacklevel=2)
    loop = _Loop(session, begun, progress)
    with graceful_stop(announce=progress and accelerator.is_local_main_process) as request:
        loop.run(lambda step: bool(request) or (stop is not None and stop(step)))
    return loop.finish()


def _clear_run_files(output: Path) -> None:
    """A new run into an existing output (--overwrite): the old run's checkpoints and logs go."""
    for name in RUN_ENTRIES:
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class _Loop:
    """One run's steps: where it is, what it logged, how it ended."""

    def __init__(self, session: Session, begun: resuming.Start, progress: bool) -> None:
        self.session, self.progress = session, progress
        s, accelerator = session.run.spec, session.accelerator
        self.metrics = MetricsLog(s.output, accelerator, bool(s.report_to))
        session.stepper.events = self.metrics.event
        self.position = checkpoints.Position.start(session.trainable_shapes())
        self.written: list[Path] = []
        self.status, self.reason = COMPLETED, None
        if begun.checkpoint is not None:
            session.check_resumes(begun.checkpoint, begun.position)
            session.state.load_checkpoint(begun.checkpoint)
            self.position = begun.position
            session.stepper.resume(begun.position.micro_batch, begun.position.backoffs)
        elif begun.started_from is not None:
            self._continued(begun.started_from)
        if session.run.fit is not None:  # --memory-limit: what the plan chose and why (every candidate: the manifest)
            self.metrics.event(0, "memory_fit", **{k: v for k, v in session.run.fit.items() if k != "candidates"})
        if s.report_to:
            accelerator.init_trackers(f"adapters-{session.run.strategy.name}", config=_flat(s))

    def _continued(self, started_from: dict[str, Any]) -> None:
        """A run continued from a final save: said in one line, in metrics.jsonl and in the manifest."""
        self.position.started_from = started_from
        self.metrics.event(0, "continued", **started_from)
        if self.progress and self.session.accelerator.is_local_main_process:
            before = started_from["steps_before"]
            print(f"Continuing {started_from['run']} from its final save (no checkpoint; "
                  f"{'an unknown number of' if before is None else before} steps before): a fresh optimizer and "
                  f"learning-rate schedule for {self.session.run.spec.max_steps} more steps.", file=sys.stderr,
                  flush=True)

    def run(self, stop: Callable[[int], bool]) -> None:
        """Step until ``max_steps``, a failure, or ``stop``."""
        from tqdm.auto import tqdm

        session, p, s = self.session, self.position, self.session.run.spec
        if not p.before:
            p.before = clean(session.evaluate())[0]
        bar = tqdm(total=s.max_steps, initial=p.step, desc=f"train {session.run.strategy.name}", unit="step",
                   disable=not self.progress or not session.accelerator.is_local_main_process)
        batches = session.batches(p)
        pending: list[torch.Tensor] = []  # this interval's step losses, on the device
        tokens = torch.tensor(p.tokens // session.accelerator.num_processes, device=session.accelerator.device)
        grad_norm, start = None, time.perf_counter() - p.seconds
        with bar:
            while p.step < s.max_steps:
                step_batches = next(batches)
                done = session.stepper.step(step_batches, p.step + 1)
                if done is None:  # out of memory even with a micro-batch of 1
                    self.status, self.reason = FAILED, session.stepper.failure
                    return
                pending.append(done[0])
                grad_norm = done[1] if done[1] is not None else grad_norm
                tokens += tokens_of(step_batches)
                p.step += 1
                bar.update()
                stopping = self._agreed(stop(p.step)) and p.step < s.max_steps
                saving = _due(p.step, s.save_every) or stopping
                if saving or _due(p.step, s.log_every) or _due(p.step, s.eval_every) or p.step == s.max_steps:
                    p.seconds = time.perf_counter() - start
                    if not self._log(pending, tokens, grad_norm, bar):
                        return  # failed: something not finite; the last good checkpoint stays
                    pending = []
                if saving:
                    self._checkpoint()
                if stopping:
                    self.status, self.reason = INTERRUPTED, f"interrupted after step {p.step}"
                    return

    def _agreed(self, stop: bool) -> bool:
        """Whether any process was asked to stop after this step (a signal reaches each at its own moment): all
        stop together, or their collectives would no longer match. One tiny all-reduce a step with several."""
        accelerator = self.session.accelerator
        if accelerator.num_processes == 1:
            return stop
        flag = torch.tensor([int(stop)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())

    def _log(self, pending: list[torch.Tensor], tokens: torch.Tensor, grad_norm: Any, bar) -> bool:
        """One line of metrics (and an evaluation when due); False when something was not finite."""
        session, p = self.session, self.position
        stacked = torch.stack(pending)
        if session.accelerator.num_processes > 1:
            # Each process saw its own rows: a step's loss is the mean over the processes, as its gradient is, and
            # its tokens are their sum, so every process logs what one process with all the rows would.
            stacked = session.accelerator.reduce(stacked, reduction="mean")
            tokens = session.accelerator.reduce(tokens.clone(), reduction="sum")
        losses = stacked.tolist()  # the one host synchronisation of the interval
        p.losses += [v if math.isfinite(v) else None for v in losses]
        p.tokens = int(tokens.item())
        values = {"loss": losses[-1], "learning_rate": session.scheduler.get_last_lr()[0],
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "tokens_per_s": p.tokens / p.seconds if p.seconds else None}
        what = session.health.interval(losses, values["grad_norm"], p.step)
        if what is None and _due(p.step, session.run.spec.eval_every):
            values.update({f"eval_{k}": v for k, v in session.evaluate().items()})
            what = non_finite_metric(values, "eval_", f"at step {p.step}")
        if what is not None:
            self._fail(what)
            self.metrics.log(p.step, **values, status=FAILED)
            return False
        self.metrics.log(p.step, **values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['learning_rate']:.2e}",
                        tok_s=f"{values['tokens_per_s'] or 0:,.0f}")
        return True

    def _fail(self, what: str) -> None:
        self.status = FAILED
        self.reason = (f"{what}; stopped there and saved nothing (the last good checkpoint and any earlier save "
                       "stay). Lower --learning-rate, or check the data.")

    def _checkpoint(self) -> None:
        session, p = self.session, self.position
        s = session.run.spec
        if not s.output:
            return
        p.micro_batch, p.backoffs = session.stepper.micro_batch, list(session.stepper.backoffs)  # for a resume
        settings = {"spec": dataclasses.asdict(s), "run": session.run.chosen()}
        written = session.state.save_checkpoint(s.output, p, settings, s.keep_checkpoints)
        if written is not None:
            self.written.append(written)

    def finish(self) -> TrainResult:
        """Evaluate a completed run and save it; the result, whatever the status."""
        session, p = self.session, self.position
        s, run, accelerator = session.run.spec, session.run, session.accelerator
        model = accelerator.unwrap_model(session.model)
        engine.uncompile_layers(model)  # the model given back runs as it was loaded, for generation and the rest
        after: dict[str, float | None] = dict.fromkeys(p.before)
        output = None
        if self.status == COMPLETED:
            session.state.finish()  # the result in the dtypes the strategy gave it (what adapters.load gives back)
            if (what := session.health.weights(p.step)) is not None:
                self._fail(what)
            else:
                after = session.evaluate()
                if (what := non_finite_metric(after, "", f"after step {p.step}")) is not None:
                    self._fail(what)
            if self.status == COMPLETED:
                output = self._final_save(model)
            else:
                self.metrics.log(p.step, **{f"eval_{k}": v for k, v in after.items()}, status=FAILED)
        if s.report_to:
            accelerator.end_training()
        stepper = session.stepper
        return TrainResult(
            run.strategy.name, s.model, run.quantization, run.task, p.step, session.parameters, p.before, after,
            p.losses, p.tokens / p.seconds if p.seconds else 0.0, p.seconds, output,
            accelerator.num_processes, accelerator.is_main_process, self.status, self.reason,
            [c for c in self.written if c.exists()],
            f"adapters train --resume {s.output}" if self.status == INTERRUPTED and s.output else None,
            model, session.base, batch_size=stepper.micro_batch, gradient_accumulation_steps=stepper.accumulation,
            backoffs=list(stepper.backoffs), precision=session.precision, compiled=dict(session.compiled),
            memory_fit=run.fit, engine=engine_now(session, model), tokens=p.tokens)

    def _final_save(self, model: torch.nn.Module) -> Path | None:
        """The whole model saved into the output, which the run made (or was allowed to replace), keeping its
        checkpoints and logs."""
        session = self.session
        whole = session.state.whole() if session.run.spec.output else None
        if whole is None:
            return None
        trained, base = whole
        return session.state.save_weights(trained, base, session.run.spec.output, overwrite=True,
                                          training=training_record(session, self.position, model), keep=RUN_ENTRIES)


def _due(step: int, every: int | None) -> bool:
    return every is not None and step % every == 0


def _flat(spec: RunSpec) -> dict[str, Any]:
    """The spec as trackers take it: scalars only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dataclasses.asdict(spec).items()
            if v is not None}
