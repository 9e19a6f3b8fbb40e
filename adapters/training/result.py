"""What a training run gives back (`TrainResult`), and what its save records of it (`training_record`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..chat import uses_chat_template
from ..loading import BaseModel
from ..loss import loss_path
from ..metrics import clean
from ..nn import ParameterCount

if TYPE_CHECKING:
    from ..checkpoints import Position
    from .session import Session

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
    engine: dict[str, Any] = field(default_factory=dict)  # how it computed (adapters.rules.Engine), as it ended
    tokens: int = 0  # real tokens trained on, padding left out, resumed steps included

    def summary(self) -> dict[str, Any]:
        """What `adapters train --json` prints: strict JSON, a non-finite metric as null."""
        return {
            "status": self.status, "reason": self.reason,
            "strategy": self.strategy, "model": self.model, "quantization": self.quantization,
            "task": self.task, "steps": self.steps,
            "trainable_parameters": self.parameters.trainable, "total_parameters": self.parameters.total,
            "heldout_before": clean(self.before)[0], "heldout_after": clean(self.after)[0],
            "tokens": self.tokens, "tokens_per_s": round(self.tokens_per_s, 1), "seconds": round(self.seconds, 2),
            "batch_size": self.batch_size, "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "oom_backoffs": self.backoffs, "precision": self.precision, "compiled": self.compiled,
            "engine": self.engine, "memory_fit": self.memory_fit,
            "processes": self.processes, "output": str(self.output) if self.output else None,
            "checkpoints": [str(c) for c in self.checkpoints], "resume_command": self.resume_command,
        }


def engine_now(session: Session, model: torch.nn.Module) -> dict[str, Any]:
    """How the session computed, as it ended: the rules' choice, with what the run found out about itself (a
    compiler that failed, a model that needed its own loss)."""
    s = session.run.spec
    path = loss_path(model, s.loss_chunk) if session.run.task == "causal-lm" else "model"
    return {**session.engine.to_dict(), "compiled": bool(session.compiled["on"]), "loss_path": path}


def training_record(session: Session, position: Position, model: torch.nn.Module) -> dict[str, Any]:
    """The manifest's ``training``: the run's settings as it ran them, what resolving chose, the batch as the run
    ended with it (after any out-of-memory back-off), the precision, the engine and where it started from."""
    s, run, stepper = session.run.spec, session.run, session.stepper
    engine = engine_now(session, model)
    chosen = {k: v for k, v in run.chosen().items() if k not in ("options", "weight_decay", "max_grad_norm")}
    return {**{k: v for k, v in dataclasses.asdict(s).items()
               if k not in ("output", "overwrite", "resume", "allow_other_base")},
            **chosen,
            "batch_size": stepper.micro_batch, "gradient_accumulation_steps": stepper.accumulation,
            "requested_batch_size": s.batch_size,
            "requested_gradient_accumulation_steps": s.gradient_accumulation_steps,
            "oom_backoffs": list(stepper.backoffs), "precision": session.precision,
            **({"memory_fit": run.fit} if run.fit is not None else {}),
            "compiled": dict(session.compiled), "engine": engine,
            # How the causal-LM loss was computed: "chunked(N)", "liger" or "model" (adapters.loss).
            "loss": engine["loss_path"],
            "chat_template": uses_chat_template(run.dataset.shape),  # adapters.generate's default
            **({"started_from": position.started_from} if position.started_from else {})}
