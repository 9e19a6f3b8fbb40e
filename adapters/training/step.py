"""One optimizer step (`optimizer_step`), and the `Stepper` that takes them for a session: with its
out-of-memory back-off and its fall-back from a compiler that fails.

Out of memory in a step: the step is tried again with half the micro-batch and twice the accumulation, which
keeps the effective batch and the data: the loader still draws batches of ``batch_size`` in the same order, and
the step splits each into pieces, so every optimizer step sees the same examples as without the back-off. Each
back-off is recorded (`Stepper.backoffs`, an ``"oom_backoff"`` event in ``metrics.jsonl``, the manifest's
``training``), and checkpoints record the micro-batch, so a resumed run goes on with the micro-batch that fitted.
When even a micro-batch of 1 does not fit, the run has failed; so has a run with the optimizer in backward
(`adapters.training.in_backward`), whose weights were partly updated when memory ran out. With several processes
one cannot back off alone: the others are already in the step's collectives (FSDP's gathers, DDP's all-reduce), so
the run stops with the reason instead.
"""
from __future__ import annotations

import contextlib
import gc
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .. import engine
from .. import loss as losses
from ..errors import OutOfMemoryBackoff, TrainingFailed
from .offload import offloaded_activations
from .prepared import Prepared


def optimizer_step(model, batches: list[dict[str, torch.Tensor]], optimizer, accelerator, scheduler=None,
                   max_grad_norm: float = 0.0, micro_batch: int | None = None,
                   loss_chunk: int | None = None,
                   offload: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over ``batches`` (the micro-batches it accumulates): forward and backward of
    each, in pieces of at most ``micro_batch`` rows; then clipping, the optimizer and the scheduler.

    Each piece's loss counts by its share of the step's rows, so the update is that of one batch of
    all the rows however they are split (exactly so where the loss is a mean over equal rows, as
    it is here). Gradients are synchronised between processes on the last piece only. Returns the
    step's loss and the gradient norm before clipping (None when no clipping ran), both left on the
    device. ``accelerator`` must not accumulate itself (`adapters.training.make_accelerator` does not).

    A causal LM's loss is computed in chunks of ``loss_chunk`` tokens through its own output head, never
    the whole batch's logits (`adapters.loss`; None: the default chunk, 0: the model's own ``labels=``
    loss); any other model's is its own. An error (out of memory, say) leaves gradients behind: clear
    them with ``optimizer.zero_grad``.
    """
    pieces = [piece for batch in batches for piece in split_batch(batch, micro_batch)]
    rows = sum(_rows(piece) for piece in pieces)
    total = torch.zeros((), device=accelerator.device)
    for i, piece in enumerate(pieces):
        share = _rows(piece) / rows
        with contextlib.nullcontext() if i == len(pieces) - 1 else accelerator.no_sync(model):
            with accelerator.autocast(), _offloading(offload, accelerator.device):  # autocast: the loss's head
                loss = losses.loss(model, piece, loss_chunk)  # chunks need it (the model's forward has its own)
            accelerator.backward(loss * share)
        total += loss.detach().float() * share
    grad_norm = accelerator.clip_grad_norm_(optimized(optimizer), max_grad_norm) if max_grad_norm > 0 else None
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


def _offloading(offload: bool, device: torch.device):
    """Saved activations to host memory during the forward (``--offload-activations``), else nothing."""
    return offloaded_activations(device) if offload else contextlib.nullcontext()


def split_batch(batch: dict[str, torch.Tensor], rows: int | None) -> list[dict[str, torch.Tensor]]:
    """``batch`` in pieces of at most ``rows`` rows, in order (None: the batch whole)."""
    if rows is None or _rows(batch) <= rows:
        return [batch]
    pieces = {k: torch.split(v, rows) for k, v in batch.items()}
    return [{k: v[i] for k, v in pieces.items()} for i in range(len(pieces["input_ids"]))]


def _rows(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


def optimized(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters ``optimizer`` updates."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocator's out-of-memory error: torch's own type, or a RuntimeError saying so (CUDA, MPS, XPU)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class Stepper:
    """A session's optimizer steps: the micro-batch and accumulation they run with, and the back-offs so far.

    ``events(step, name, **values)`` hears of each back-off (the loop logs them to ``metrics.jsonl``).
    """

    def __init__(self, session: Prepared) -> None:
        self.session = session
        s = session.run.spec
        self.micro_batch, self.accumulation = s.batch_size, s.gradient_accumulation_steps
        self.backoffs: list[dict[str, Any]] = []
        self.failure: str | None = None  # why the last step could not run, once it could not
        self.events: Callable[..., Any] = lambda step, name, **values: None

    def resume(self, micro_batch: int | None, backoffs: list[dict[str, Any]]) -> None:
        """Go on with the micro-batch that fitted before, and the back-offs that got there."""
        if micro_batch is not None:
            self._set_micro_batch(micro_batch)
        self.backoffs = list(backoffs)

    def step(self, batches: list[dict[str, torch.Tensor]], number: int) -> tuple[torch.Tensor, Any] | None:
        """Optimizer step ``number`` over ``batches``; after an out-of-memory error, again with half the micro-batch.
        None when even a micro-batch of 1 does not fit (`failure` says so)."""
        session = self.session
        while True:
            try:
                return optimizer_step(session.model, batches, session.optimizer, session.accelerator,
                                      session.scheduler, session.run.max_grad_norm, self.micro_batch,
                                      session.run.spec.loss_chunk, session.run.spec.offload_activations)
            except RuntimeError as exc:  # torch.OutOfMemoryError is one
                if session.compiled["layers"] and engine.is_compile_error(exc):
                    session.compiled.update(on=False, layers=0, error=engine.fall_back(session.model, exc))
                    session.optimizer.zero_grad(set_to_none=True)  # the failed try's partial gradients
                    continue
                if not is_out_of_memory(exc):
                    raise
                error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._after_out_of_memory(number, error)
            if not self._back_off(number, error):
                return None

    def _after_out_of_memory(self, number: int, error: str) -> None:
        accelerator = self.session.accelerator
        if accelerator.num_processes > 1:
            raise TrainingFailed(
                f"out of memory at step {number} in process {accelerator.process_index} of "
                f"{accelerator.num_processes} ({error}); one process cannot halve its micro-batch alone, so the run "
                "stops here and keeps its last checkpoint. Start it again with a lower --batch-size, "
                "--gradient-checkpointing or --memory-limit.")
        # Out of the handler, the traceback and the tensors its frames held are gone.
        self.session.optimizer.zero_grad(set_to_none=True)  # the failed try's partial gradients
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _back_off(self, number: int, error: str) -> bool:
        """Halve the micro-batch and record it; False (the run has failed) when it is already 1."""
        s = self.session.run.spec
        if s.optimizer_in_backward:  # some weights were stepped already: the step cannot be taken again in pieces
            self.failure = (f"out of memory at step {number} with --optimizer-in-backward ({error}), which updates "
                            "weights during backward, so the step cannot be retried with a smaller micro-batch; "
                            "stopped there and kept the last good checkpoint. Lower --batch-size or --seq-len, or "
                            "add --gradient-checkpointing.")
            self.events(number, "out_of_memory", batch_size=self.micro_batch, status="failed", error=error)
            return False
        if self.micro_batch == 1:
            self.failure = (f"out of memory at step {number} even with a micro-batch of 1 ({error}); stopped there and "
                            "kept the last good checkpoint. Lower --seq-len, add --gradient-checkpointing, or choose "
                            "a strategy that trains fewer weights.")
            self.events(number, "out_of_memory", batch_size=self.micro_batch, status="failed", error=error)
            return False
        previous = {"from_batch_size": self.micro_batch, "from_gradient_accumulation_steps": self.accumulation}
        self._set_micro_batch(math.ceil(self.micro_batch / 2))
        record = {"step": number, "batch_size": self.micro_batch, "gradient_accumulation_steps": self.accumulation,
                  **previous, "error": error}
        self.backoffs.append(record)
        self.events(number, "oom_backoff", **{k: v for k, v in record.items() if k != "step"})
        if self.session.accelerator.is_local_main_process:
            warnings.warn(f"out of memory at step {number}: trying again with micro-batch {self.micro_batch} x "
                          f"{self.accumulation} accumulation steps (was {previous['from_batch_size']} x "
                          f"{previous['from_gradient_accumulation_steps']}); the effective batch stays "
                          f"{s.batch_size * s.gradient_accumulation_steps}.", OutOfMemoryBackoff, stacklevel=3)
        return True

    def _set_micro_batch(self, rows: int) -> None:
        s = self.session.run.spec
        self.micro_batch = rows
        self.accumulation = s.gradient_accumulation_steps * math.ceil(s.batch_size / rows)
