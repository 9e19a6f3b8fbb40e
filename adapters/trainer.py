"""The training run: resolve the spec -> load base -> apply strategy -> train -> evaluate -> save.

`adapters.runspec.resolve` checks everything a user can get wrong first. The loop is Accelerate's:
prepare, accumulate, backward, clip, step the optimizer and the learning-rate schedule
(``transformers.get_scheduler``). Along the way it logs ``OUTPUT/metrics.jsonl`` and Accelerate's
trackers, evaluates the held-out split every ``eval_every`` steps, and writes a checkpoint every
``save_every`` steps (`adapters.checkpoints`). A first SIGINT or SIGTERM ends the run after the
current step with a checkpoint. Losses stay on the device between logging steps: no host
synchronisation per step. The optimizer is `adapters.engine.make_optimizer`'s AdamW (fused where torch
has the kernel); with ``--compile`` (on by default where `adapters.engine.compile_by_default` says) each
decoder layer is compiled, and a compiler that fails at the first step leaves the run going on uncompiled
with a `CompileFallback` warning. The result and the manifest's ``training["compiled"]`` say which ran.

A run ends as failed, naming what and where, and saves nothing (its last good checkpoint and any
earlier save in its output stay) when a loss, the gradient norm or a trainable weight stops being
finite (checked at each logging step), when a trainable weight is not finite at the end, or when a
held-out metric after training is not finite. A metric that was not measured (``eval_batches``
0) is None, never 0.

Out of memory in a training step: the step is tried again with half the micro-batch and twice the
accumulation, which keeps the effective batch and the data: the loader still draws batches of
``batch_size`` in the same order, and the step splits each into pieces (`optimizer_step`), so
every optimizer step sees the same examples as without the back-off. Each back-off is recorded in
the result, as an ``"event": "oom_backoff"`` line of ``metrics.jsonl`` and in the manifest's
``training`` (``batch_size`` and ``gradient_accumulation_steps`` as the run ended with them,
``requested_batch_size``, ``requested_gradient_accumulation_steps`` and ``oom_backoffs``). When
even a micro-batch of 1 does not fit, the run ends as failed. Checkpoints record the micro-batch
and the back-offs, so a resumed run goes on with the micro-batch that fitted. Held-out evaluation
keeps batches of ``batch_size``. In a data-parallel run each process backs off on its own; they
are not coordinated.

Precision: see `adapters.training` (float32 master weights under bf16 autocast on a GPU); the
manifest's ``training["precision"]`` records it.

``accelerate launch --multi_gpu -m adapters train`` on GPUs, or ``torchrun --nproc_per_node N -m
adapters train`` on the CPU, runs it data-parallel unchanged: one process saves and reports.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoints, engine
from .chat import uses_chat_template
from .contract import SavesOwnFormat
from .data import IGNORE_INDEX
from .errors import AdaptersError, NothingKept, OutOfMemoryBackoff, TrainingFailed
from .host import distribution_of
from .interrupts import graceful_stop
from .loading import BaseModel
from .loss import loss_path
from .manifest import RUN_ENTRIES, read_manifest
from .metrics import MetricsLog, clean
from .nn import ParameterCount, count_parameters
from .runspec import Run, RunSpec, resolve
from .sharding import is_sharded, load_optimizer_state, save_optimizer_state, whole_model, whole_optimizer_state
from .store import check_base, load_trainable, restore, save
from .training import (
    apply_strategy,
    compiles,
    evaluate,
    is_out_of_memory,
    keep_float32_trainable,
    load_base,
    make_accelerator,
    make_batches,
    optimizer_step,
    restore_dtypes,
    trainable_dtypes,
)

# What a run writes into its output besides the final save; kept when the final save replaces it.
RUN_FILES = RUN_ENTRIES
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
    batch_size: int | None = None  # the micro-batch the run ended with: smaller after out-of-memory back-offs
    gradient_accumulation_steps: int | None = None  # ... and the accumulation that keeps the effective batch
    backoffs: list[dict[str, Any]] = field(default_factory=list)  # each out-of-memory back-off, in order
    # base_dtype: the frozen weights'; trainable_dtype: the trained weights' while training; master_weights: the
    # dtypes the strategy gave the weights kept as float32 master weights (rounded back to them at the end); autocast.
    precision: dict[str, Any] = field(default_factory=dict)
    # Whether the decoder layers ran compiled (--compile): "on", the layers compiled, and "error" when compiling
    # failed and the run went on without it.
    compiled: dict[str, Any] = field(default_factory=dict)
    # --memory-limit: what the plan chose (micro-batch, accumulation, checkpointing) and why; None when not fitted.
    memory_fit: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """What `adapters train --json` prints: strict JSON, a non-finite metric as null."""
        return {
            "status": self.status, "reason": self.reason,
            "strategy": self.strategy, "model": self.model, "quantization": self.quantization,
            "task": self.task, "steps": self.steps,
            "trainable_parameters": self.parameters.trainable, "total_parameters": self.parameters.total,
            "heldout_before": clean(self.before)[0], "heldout_after": clean(self.after)[0],
            "tokens_per_s": round(self.tokens_per_s, 1), "seconds": round(self.seconds, 2),
            "batch_size": self.batch_size, "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "oom_backoffs": self.backoffs, "precision": self.precision, "compiled": self.compiled,
            "memory_fit": self.memory_fit,
            "processes": self.processes, "output": str(self.output) if self.output else None,
            "checkpoints": [str(c) for c in self.checkpoints], "resume_command": self.resume_command,
        }


def train(spec: RunSpec, progress: bool = True, stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train a strategy on a base model and data, evaluate it before and after, and save it.

    ``stop(step)``, called after every optimizer step, ends the run there as a signal would: with a
    checkpoint (when the run has an output) and status "interrupted".
    """
    # A resume with a final save and no checkpoint continues from the save, with a fresh optimizer.
    spec, started_from = checkpoints.continuing(spec)
    run = resolve(spec)
    s = run.spec
    if s.output and s.overwrite and not s.resume and started_from is None:
        _clear_run_files(Path(s.output))
    accelerator = make_accelerator(s.report_to, Path(s.output) / "logs" if s.output else None, s.sharding)
    if s.sharding == "none" and accelerator.distributed_type == "FSDP":  # `accelerate launch --use_fsdp`, a config
        run = dataclasses.replace(run, spec=dataclasses.replace(s, sharding="fsdp"))
        s = run.spec
    resume_from = checkpoints.latest_checkpoint(s.output) if s.resume else None
    position = checkpoints.read(resume_from)[0] if resume_from is not None else None
    model = _model(run, accelerator, resume_from, position, Path(s.output) if started_from else None)
    if not s.output:  # said once the model is ready, before the first step
        warnings.warn("no --output, so nothing of this run will be kept: give --output DIR to save the weights, "
                      "checkpoints and metrics.", NothingKept, stacklevel=2)
    loop = _Loop(run, accelerator, model)
    if resume_from is not None:
        loop.resume(resume_from, position)
    elif started_from is not None:
        loop.continue_from(started_from, progress)
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


@dataclass
class _Model:
    """The base, the model to train, and the precision it trains in."""

    base: BaseModel
    model: torch.nn.Module
    dtypes: dict[str, torch.dtype]  # the strategy's dtype of each weight that trains as a float32 master weight
    precision: dict[str, Any]
    other_base: dict[str, str] | None = None  # resumed onto other weights (--allow-other-base)


def _model(run: Run, accelerator, checkpoint: Path | None, position: checkpoints.Position | None,
           saved: Path | None = None) -> _Model:
    """The base and the model to train: freshly applied, restored from a checkpoint's weights, or
    restored from the final save in ``saved`` (a run continued with a fresh optimizer)."""
    base = load_base(run, accelerator.device)
    base_dtype = str(base.model.dtype).removeprefix("torch.")
    other_base = None
    if saved is not None:
        other_base = check_base(saved, read_manifest(saved), base, run.spec.allow_other_base)
        model = restore(run.strategy, base.model, saved, run.config)
        dtypes = keep_float32_trainable(model)
        if count_parameters(model).trainable == 0:  # e.g. PEFT's prefix with projection, saved for inference
            raise AdaptersError(f"{saved}: strategy {run.strategy.name!r} restores these weights for inference only "
                                "(nothing is trainable once loaded), so they cannot be trained further. Start a new "
                                "run instead of --resume.")
    elif checkpoint is None or position is None:
        model, _, dtypes = apply_strategy(run, base)
    else:
        saved = checkpoint / checkpoints.MODEL
        other_base = check_base(saved, read_manifest(saved), base, run.spec.allow_other_base)
        model = restore(run.strategy, base.model, saved, run.config)
        dtypes = keep_float32_trainable(model)
        if dtypes and not isinstance(run.strategy, SavesOwnFormat):
            # The checkpoint holds the float32 master weights; restoring went through the strategy's dtype.
            load_trainable(model, checkpoint / checkpoints.MODEL)
        if _trainable(model) != position.trainable:  # e.g. PEFT's prefix with projection saves only what inference uses
            raise AdaptersError(f"{checkpoint}: strategy {run.strategy.name!r} restores other trainable weights "
                                "than the run trained (it saves these options for inference), so this run cannot "
                                "be resumed. Start it again without --resume.")
    precision = {"base_dtype": base_dtype, "trainable_dtype": trainable_dtypes(model),
                 "master_weights": sorted({str(d).removeprefix("torch.") for d in dtypes.values()}),
                 "autocast": None if accelerator.mixed_precision == "no" else accelerator.mixed_precision}
    return _Model(base, model, dtypes, precision, other_base)


def _trainable(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters() if p.requires_grad}


def _non_finite_weight(model: torch.nn.Module) -> str | None:
    """The name of the first trainable weight holding a NaN or an infinity, or None (one host synchronisation)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        return None
    finite = [torch.isfinite(p).all() for _, p in named]
    finite = torch.stack([f.to(finite[0].device) for f in finite])
    return None if bool(finite.all()) else named[int((~finite).nonzero()[0])][0]


class _Loop:
    """One run's state between the steps: what is prepared, where it is, what it logged."""

    def __init__(self, run: Run, accelerator, built: _Model) -> None:
        from transformers import get_scheduler

        s = self.spec = run.spec
        model = built.model
        self.run, self.accelerator, self.base = run, accelerator, built.base
        self.dtypes, self.precision, self.other_base = built.dtypes, built.precision, built.other_base
        self.parameters = count_parameters(model)
        train_set = make_batches(run.dataset.train, self.base, s.seq_len, "train", packing=bool(s.packing),
                                 train_on_prompt=s.train_on_prompt)
        # Held-out examples one a row and always masked: the held-out loss is on completions, whatever the training.
        eval_set = make_batches(run.dataset.heldout, self.base, s.seq_len, "held-out")
        # Loaders draw their workers' seeds from their own generators, never from the global one that
        # dropout uses, so where a run is resumed does not change its random numbers.
        train_loader = torch.utils.data.DataLoader(train_set, batch_size=s.batch_size, shuffle=True,
                                                   collate_fn=train_set.collate,
                                                   generator=torch.Generator().manual_seed(s.seed))
        eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=s.batch_size, collate_fn=eval_set.collate,
                                                  generator=torch.Generator().manual_seed(s.seed))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = engine.make_optimizer(trainable, run.learning_rate, run.weight_decay, accelerator.device)
        on = compiles(s, accelerator.device)
        self.compiled = {"on": on, "layers": engine.compile_layers(model) if on else 0, "error": None}
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
        self.before: dict[str, float | None] = {}
        self.written: list[Path] = []
        self.status, self.reason = COMPLETED, None
        # Out-of-memory back-offs: the micro-batch each loaded batch is split into, and the steps it takes.
        self.micro_batch, self.accumulation = s.batch_size, s.gradient_accumulation_steps
        self.backoffs: list[dict[str, Any]] = []
        self.metrics = MetricsLog(s.output, accelerator, bool(s.report_to))
        if run.fit is not None:  # --memory-limit: what the plan chose and why (every candidate: the manifest)
            self.metrics.event(0, "memory_fit", **{k: v for k, v in run.fit.items() if k != "candidates"})
        if s.report_to:
            accelerator.init_trackers(f"adapters-{run.strategy.name}", config=_flat(s))

    def continue_from(self, started_from: dict[str, Any], progress: bool) -> None:
        """A run continued from a final save: said in one line, in metrics.jsonl and in the manifest."""
        self.position.started_from = started_from
        self.metrics.event(0, "continued", **started_from)
        if progress and self.accelerator.is_local_main_process:
            before = started_from["steps_before"]
            print(f"Continuing {started_from['run']} from its final save (no checkpoint; "
                  f"{'an unknown number of' if before is None else before} steps before): a fresh optimizer and "
                  f"learning-rate schedule for {self.spec.max_steps} more steps.", file=sys.stderr, flush=True)

    def resume(self, checkpoint: Path, position: checkpoints.Position) -> None:
        if is_sharded(self.model):
            load_optimizer_state(checkpoint, self.accelerator.unwrap_model(self.model), self.optimizer.optimizer,
                                 self.scheduler.scheduler)
        else:
            self.accelerator.load_state(str(checkpoint))
        self.position = position
        self.before = position.before
        if position.micro_batch is not None:  # go on with the micro-batch that fitted
            self._set_micro_batch(position.micro_batch)
        self.backoffs = list(position.backoffs)

    def _set_micro_batch(self, rows: int) -> None:
        s = self.spec
        self.micro_batch = rows
        self.accumulation = s.gradient_accumulation_steps * math.ceil(s.batch_size / rows)

    def evaluate(self) -> dict[str, float | None]:
        with engine.eager():  # compiling for a few held-out batches would cost more than it saves
            return evaluate(self.model, self.eval_loader, self.run.task, self.accelerator, self.spec.eval_batches)

    def train(self, stop: Callable[[int], bool], progress: bool) -> None:
        from tqdm.auto import tqdm

        s, p = self.spec, self.position
        if not self.before:
            self.before = self.evaluate()
            p.before = clean(self.before)[0]
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
                step_batches = [next(batches) for _ in range(s.gradient_accumulation_steps)]
                done = self._step(step_batches)
                if done is None:
                    return  # failed: out of memory even with a micro-batch of 1
                step_loss, norm = done
                grad_norm = norm if norm is not None else grad_norm
                for batch in step_batches:
                    tokens += _tokens(batch)
                p.step += 1
                pending.append(step_loss)
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
        finally:
            bar.close()

    def _agreed(self, stop: bool) -> bool:
        """Whether any process was asked to stop after this step (a signal reaches each at its own moment): all
        stop together, or their collectives would no longer match. One tiny all-reduce a step with several."""
        if self.accelerator.num_processes == 1:
            return stop
        flag = torch.tensor([int(stop)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item())

    def _step(self, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """One optimizer step; after an out-of-memory error, again with half the micro-batch. None when
        even a micro-batch of 1 does not fit (the run has then failed)."""
        while True:
            try:
                return optimizer_step(self.model, batches, self.optimizer, self.accelerator, self.scheduler,
                                      self.run.max_grad_norm, self.micro_batch, loss_chunk=self.spec.loss_chunk)
            except RuntimeError as exc:  # torch.OutOfMemoryError is one
                if self.compiled["layers"] and engine.is_compile_error(exc):
                    self.compiled.update(on=False, layers=0, error=engine.fall_back(self.model, exc))
                    self.optimizer.zero_grad(set_to_none=True)  # the failed try's partial gradients
                    continue
                if not is_out_of_memory(exc):
                    raise
                error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if self.accelerator.num_processes > 1:
                # The others went on into the step's collectives (FSDP's gathers, DDP's all-reduce): one process
                # cannot go back to the start of the step alone, and its collectives would pair with the wrong ones.
                raise TrainingFailed(
                    f"out of memory at step {self.position.step + 1} in process {self.accelerator.process_index} "
                    f"of {self.accelerator.num_processes} ({error}); one process cannot halve its micro-batch alone, "
                    "so the run stops here and keeps its last checkpoint. Start it again with a lower --batch-size, "
                    "--gradient-checkpointing or --memory-limit.")
            # Out of the handler, the traceback and the tensors its frames held are gone.
            self.optimizer.zero_grad(set_to_none=True)  # the failed try's partial gradients
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if not self._back_off(error):
                return None

    def _back_off(self, error: str) -> bool:
        """Halve the micro-batch and record it; False (the run has failed) when it is already 1."""
        s, step = self.spec, self.position.step + 1
        if self.micro_batch == 1:
            self.status = FAILED
            self.reason = (f"out of memory at step {step} even with a micro-batch of 1 ({error}); stopped there and "
                           "kept the last good checkpoint. Lower --seq-len, add --gradient-checkpointing, or "
                           "choose a strategy that trains fewer weights.")
            self.metrics.event(step, "out_of_memory", batch_size=self.micro_batch, status=FAILED, error=error)
            return False
        previous = {"from_batch_size": self.micro_batch, "from_gradient_accumulation_steps": self.accumulation}
        self._set_micro_batch(math.ceil(self.micro_batch / 2))
        record = {"step": step, "batch_size": self.micro_batch, "gradient_accumulation_steps": self.accumulation,
                  **previous, "error": error}
        self.backoffs.append(record)
        self.position.micro_batch, self.position.backoffs = self.micro_batch, list(self.backoffs)  # for a resume
        self.metrics.event(step, "oom_backoff", **{k: v for k, v in record.items() if k != "step"})
        if self.accelerator.is_local_main_process:
            warnings.warn(f"out of memory at step {step}: trying again with micro-batch {self.micro_batch} x "
                          f"{self.accumulation} accumulation steps (was {previous['from_batch_size']} x "
                          f"{previous['from_gradient_accumulation_steps']}); the effective batch stays "
                          f"{s.batch_size * s.gradient_accumulation_steps}.", OutOfMemoryBackoff, stacklevel=2)
        return True

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

    def _fail(self, what: str) -> None:
        self.status = FAILED
        self.reason = (f"{what}; stopped there and saved nothing (the last good checkpoint and any earlier save "
                       "stay). Lower --learning-rate, or check the data.")

    def _log(self, pending: list[torch.Tensor], tokens: torch.Tensor, grad_norm, bar) -> bool:
        """One line of metrics (and an evaluation when due); False when something was not finite."""
        p = self.position
        stacked = torch.stack(pending)
        if self.accelerator.num_processes > 1:
            # Each process saw its own rows: a step's loss is the mean over the processes, as its gradient is, and
            # its tokens are their sum, so every process logs what one process with all the rows would.
            stacked = self.accelerator.reduce(stacked, reduction="mean")
            tokens = self.accelerator.reduce(tokens.clone(), reduction="sum")
        losses = stacked.tolist()  # the one host synchronisation of the interval
        p.losses += [v if math.isfinite(v) else None for v in losses]
        p.tokens = int(tokens.item())
        values = {"loss": losses[-1], "learning_rate": self.scheduler.get_last_lr()[0],
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "tokens_per_s": p.tokens / p.seconds if p.seconds else None}
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:
            what = f"the loss became {losses[bad]} at step {p.step - len(losses) + bad + 1}"
        elif values["grad_norm"] is not None and not math.isfinite(values["grad_norm"]):
            what = f"the gradient norm became {values['grad_norm']} at step {p.step}"
        elif (name := self._non_finite_weight()) is not None:
            what = f"the trainable weight {name} became non-finite by step {p.step}"
        elif _due(p.step, self.spec.eval_every):
            values.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            self.model.train()
            what = _non_finite_metric(values, "eval_", f"at step {p.step}")
        else:
            what = None
        if what is not None:
            self._fail(what)
            self.metrics.log(p.step, **values, status=FAILED)
            return False
        self.metrics.log(p.step, **values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['learning_rate']:.2e}",
                        tok_s=f"{values['tokens_per_s'] or 0:,.0f}")
        return True

    def _non_finite_weight(self) -> str | None:
        """The first trainable weight holding a NaN or an infinity; a sharded model's shards all checked, so that
        every process gives the same answer."""
        model = self.accelerator.unwrap_model(self.model)
        if not is_sharded(self.model):
            return _non_finite_weight(model)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        local = [p.to_local() if hasattr(p, "to_local") else p for _, p in named]  # this process's shard (DTensor)
        finite = torch.stack([torch.isfinite(t).all().to(self.accelerator.device) for t in local]).int()
        finite = self.accelerator.reduce(finite, reduction="sum") == self.accelerator.num_processes
        return None if bool(finite.all()) else named[int((~finite).nonzero()[0])][0]

    def _checkpoint(self) -> None:
        s, run, accelerator = self.spec, self.run, self.accelerator
        accelerator.wait_for_everyone()
        if not s.output:
            return
        if is_sharded(self.model):  # gathered by every process; written by the main one
            whole = whole_model(self.accelerator.unwrap_model(self.model), self.run, self.accelerator.is_main_process)
            optimizer_state = whole_optimizer_state(accelerator.unwrap_model(self.model), self.optimizer.optimizer)
            if accelerator.is_main_process:
                model, base = whole

                def save_sharded(directory: Path) -> None:
                    save(model, directory, strategy=run.strategy, config=run.config, base=base,
                         plugin_versions=dict([distribution_of(run.plugin)]), other_base=self.other_base)

                self.written.append(checkpoints.write(
                    s.output, self.position, s, save_sharded,
                    lambda d: save_optimizer_state(d, optimizer_state, self.scheduler), s.keep_checkpoints))
            accelerator.wait_for_everyone()
            return
        if accelerator.is_main_process:
            def save_model(directory: Path) -> None:
                save(accelerator.unwrap_model(self.model), directory, strategy=run.strategy, config=run.config,
                     base=self.base, plugin_versions=dict([distribution_of(run.plugin)]), other_base=self.other_base)

            self.written.append(checkpoints.write(s.output, self.position, s, save_model,
                                                  lambda d: accelerator.save_state(str(d)), s.keep_checkpoints))
        accelerator.wait_for_everyone()

    def finish(self) -> TrainResult:
        s, run, p, accelerator = self.spec, self.run, self.position, self.accelerator
        model = accelerator.unwrap_model(self.model)
        engine.uncompile_layers(model)  # the model given back runs as it was loaded, for generation and the rest
        after: dict[str, float | None] = dict.fromkeys(self.before)
        output = None
        if self.status == COMPLETED:
            # The result in the dtypes the strategy gave it (what adapters.load gives back), then checked.
            if not is_sharded(self.model):  # a sharded run's save rounds its own gathered copy (_final_save)
                restore_dtypes(model, self.dtypes)
            if (name := self._non_finite_weight()) is not None:
                self._fail(f"the trainable weight {name} is not finite at the end, after step {p.step}")
            else:
                after = self.evaluate()
                if (what := _non_finite_metric(after, "", f"after step {p.step}")) is not None:
                    self._fail(what)
            if self.status == COMPLETED:
                output = self._final_save()
            else:
                self.metrics.log(p.step, **{f"eval_{k}": v for k, v in after.items()}, status=FAILED)
        if s.report_to:
            accelerator.end_training()
        resume = f"adapters train --resume {s.output}" if self.status == INTERRUPTED and s.output else None
        return TrainResult(
            run.strategy.name, s.model, run.quantization, run.task, p.step, self.parameters, self.before, after,
            p.losses, p.tokens / p.seconds if p.seconds else 0.0, p.seconds, output,
            accelerator.num_processes, accelerator.is_main_process, self.status, self.reason,
            [c for c in self.written if c.exists()], resume, model, self.base,
            batch_size=self.micro_batch, gradient_accumulation_steps=self.accumulation,
            backoffs=list(self.backoffs), precision=dict(self.precision), compiled=dict(self.compiled),
            memory_fit=run.fit)

    def _final_save(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.spec.output:
            return None
        if not is_sharded(self.model):
            return self._save_whole(self.accelerator.unwrap_model(self.model), self.base) \
                if self.accelerator.is_main_process else None
        whole = whole_model(self.accelerator.unwrap_model(self.model), self.run, self.accelerator.is_main_process)
        if whole is None:
            return None
        model, base = whole
        restore_dtypes(model, self.dtypes)
        return self._save_whole(model, base)

    def _save_whole(self, model: torch.nn.Module, base: BaseModel) -> Path:
        s, run = self.spec, self.run
        training = {**{k: v for k, v in dataclasses.asdict(s).items()
                       if k not in ("output", "overwrite", "resume", "allow_other_base")},
                    "quantization": run.quantization, "task": run.task, "learning_rate": run.learning_rate,
                    "lr_scheduler": run.lr_scheduler, "warmup_steps": run.warmup_steps,
                    # The batch as the run ended with it, after any out-of-memory back-off.
                    "batch_size": self.micro_batch, "gradient_accumulation_steps": self.accumulation,
                    "requested_batch_size": s.batch_size,
                    "requested_gradient_accumulation_steps": s.gradient_accumulation_steps,
                    "oom_backoffs": list(self.backoffs), "precision": dict(self.precision),
                    **({"memory_fit": run.fit} if run.fit is not None else {}),
                    "compiled": dict(self.compiled),
                    # How the causal-LM loss was computed: "chunked(N)", "liger" or "model" (adapters.loss).
                    "loss": loss_path(model, s.loss_chunk),
                    "chat_template": uses_chat_template(run.dataset.shape),  # adapters.generate's default
                    **({"started_from": self.position.started_from} if self.position.started_from else {})}
        # The run made this directory (or was allowed to replace it): replace it, keeping its checkpoints.
        return save(model, s.output, strategy=run.strategy, config=run.config,
                    base=base, overwrite=True, plugin_versions=dict([distribution_of(run.plugin)]),
                    training=training, keep=RUN_FILES, other_base=self.other_base)


def _non_finite_metric(values: dict[str, Any], prefix: str, where: str) -> str | None:
    """What held-out metric in ``values`` (named ``prefix``...) is not finite, said with ``where``."""
    bad = next(((k, v) for k, v in values.items()
                if k.startswith(prefix) and isinstance(v, float) and not math.isfinite(v)), None)
    return None if bad is None else f"the held-out {bad[0].removeprefix(prefix)} became {bad[1]} {where}"


def _due(step: int, every: int | None) -> bool:
    return every is not None and step % every == 0


def _tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
    """The real tokens of ``batch``, padding left out, on its device (no host synchronisation).

    Padded rows say theirs by the attention mask. Packed rows (`adapters.data.packed`: position ids, no mask) end in
    padding whose position ids restart at 0 and whose labels are all ignored, where every real example trains at
    least one label; document blocks have no padding."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum()
    ids, positions, labels = batch["input_ids"], batch.get("position_ids"), batch.get("labels")
    if positions is None or labels is None:
        return ids.numel()
    columns = torch.arange(ids.shape[1], device=ids.device)
    last = torch.where(positions == 0, columns, 0).amax(dim=1, keepdim=True)  # where each row's last segment starts
    tail = columns >= last
    padding = tail & ~((labels != IGNORE_INDEX) & tail).any(dim=1, keepdim=True)  # a last segment that trains nothing
    return ids.numel() - padding.sum()


def _flat(spec: RunSpec) -> dict[str, Any]:
    """The spec as trackers take it: scalars only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dataclasses.asdict(spec).items()
            if v is not None}
