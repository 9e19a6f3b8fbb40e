"""Fit a run into a memory limit: the planner chooses the micro-batch, gradient checkpointing and accumulation.

`adapters train --memory-limit SIZE` (and `adapters bench --memory-limit SIZE` without a capacity search) keeps
the effective batch the user asked for, E = ``batch_size x gradient_accumulation_steps``, and runs the way that
is fastest among those predicted to fit:

- **Candidates**: every micro-batch m that divides E, so that each optimizer step still sees E rows, in k = E / m
  micro-batches of equal size (a micro-batch that does not divide E would need an uneven last piece); each
  without gradient checkpointing, with the fewest layers checkpointed that fits (``--checkpoint-layers``: the
  first n of the decoder's L), and with every layer checkpointed; and on CUDA without and with saved activations
  offloaded to host memory (`adapters.training.offload`). Only with the checkpointing asked for when the run asks
  (``--gradient-checkpointing``, ``--checkpoint-layers``: the fit then chooses the micro-batch and the offload),
  only without it when the strategy cannot checkpoint; only with offload when the run asks for
  ``--offload-activations``. The fewest layers is found by bisection: each layer checkpointed keeps its input
  alone where it kept every tensor its backward reads, so the predicted peak falls as n grows.
- **Predicted peak**: the plan's peak for a micro-batch of m rows (`adapters.plan.estimate`, for the device the
  run goes to: "cuda" in bf16, "cpu" in fp32). With k > 1, the gradients of the earlier micro-batches stay alive
  through the later ones, and each new gradient is added into them (one more gradient tensor at a time): the
  plan's phases before the gradients exist are taken again with every gradient added, and the largest trainable
  tensor on top (`_accumulating_peak`). It fits when it is at most the limit less `HEADROOM`.
- **Predicted time** of an optimizer step, in token-equivalents: ``k x ((1 + c n/L) x m x seq_len +
  MICRO_STEP_TOKENS[device])``. Checkpointing runs a layer's forward again in backward: c, the forward's share
  of a step, is a third when backward computes the weights' gradients and the inputs' (two matmuls for the
  forward's one: full fine-tuning), and a half when the base is frozen and backward computes the inputs'
  alone (LoRA, QLoRA: `CHECKPOINTING_COST`). Each micro-step has a fixed cost beside its tokens (launching its
  kernels, reading every weight once), counted as that many tokens' worth: a rule of thumb, not a measurement,
  which makes larger micro-batches somewhat faster per row on a GPU. A CPU is compute-bound from a few tokens on,
  so there it is 0. Offloading costs ``OFFLOAD_COST`` more: its copies overlap the compute on a side stream, but
  share the memory bus (a rule of thumb too, until benchmarks/gpu/run.sh measures it), so it is predicted faster
  than checkpointing every layer, and slower than checkpointing fewer than a fifth of them (a frozen base) or
  fewer than 30% (full fine-tuning).
- **Choice**: the lowest predicted time among the candidates that fit; at equal time, fewer layers checkpointed,
  then no offload, then the larger micro-batch. So on the CPU: no checkpointing with the largest micro-batch that
  fits, if any fits, else the fewest layers checkpointed; on a GPU, checkpointing a few layers (less than
  ``OFFLOAD_COST``'s worth of recompute) before offload, offload before checkpointing more, and both when neither
  alone fits.

Nothing fitting even at a micro-batch of 1 with checkpointing is `MemoryLimitTooSmall` (a `StrategyRefused`:
train stops with it before any weight loads, bench records a refused row), naming the smallest limit that fits.

The choice depends on the effective batch alone, never on how the spec split it, so fitting a fitted spec again
(a bench worker, a resumed run) chooses the same.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

from ..contract import ModelShape, RunShape, traits
from ..runspec import Run, RunSpec, StrategyRefused
from ..text import format_bytes
from .memory import STATIC_COMPONENTS, Plan

# The share of the limit kept free for the plan's error: on the CPU its predictions of fitted steps came within
# -6%..+11% of the measured peaks (random:tiny, every built-in strategy, tests/test_fit.py), and its target on a
# GPU is 10%, where the caching allocator also rounds blocks up.
HEADROOM = 0.10
# A micro-step's fixed cost, as that many tokens of compute (see the module's docstring).
MICRO_STEP_TOKENS = {"cpu": 0, "cuda": 1024}
# The extra compute of recomputing a layer's forward in backward, by the strategy's gradient flow
# (adapters.contract.StrategyMemory): a third of a step that also makes the weights' gradients, half of one whose
# base is frozen. Measured on the CPU (SmolLM2 LoRA, 4 x 512, benchmarks/checkpoint_layers.py): every layer
# checkpointed ran at 0.61x the tokens/s of none, 1 / (1 + 1/2) = 0.67x predicted; 10 of 30 layers at 0.81x, 0.86x
# predicted.
CHECKPOINTING_COST = {"weights": 1 / 3, "inputs": 1 / 2, "head": 0.0}
OFFLOAD_COST = 0.1  # offloaded activations' copies, overlapped with the compute (see the module's docstring)


class MemoryLimitTooSmall(StrategyRefused):
    """Nothing fits under --memory-limit, not even a micro-batch of 1 with gradient checkpointing."""


class Unpredictable(MemoryLimitTooSmall):
    """The planner cannot predict this strategy on this model (no ``estimate_memory``, or it declined), so no fit."""


@dataclass
class Candidate:
    """One way to run the effective batch, as the fit predicts it."""

    batch_size: int  # the micro-batch
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    checkpoint_layers: int | None  # with gradient_checkpointing: the first this many layers; None: every one
    offload_activations: bool
    predicted_peak_bytes: int
    predicted_time: float  # token-equivalents per optimizer step (see the module's docstring)
    fits: bool


@dataclass
class Fit:
    """What `fit` chose, and why: every candidate with its predicted peak and time."""

    limit_bytes: int
    usable_bytes: int  # the limit less HEADROOM: what a prediction must not exceed
    device: str
    effective_batch_size: int
    asked: dict[str, Any]  # batch_size, gradient_accumulation_steps, gradient_checkpointing as given
    chosen: Candidate
    reason: str
    candidates: list[Candidate] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def apply(self, spec: RunSpec) -> RunSpec:
        """``spec`` with the chosen micro-batch, accumulation and checkpointing."""
        c = self.chosen
        return dataclasses.replace(spec, batch_size=c.batch_size, gradient_checkpointing=c.gradient_checkpointing,
                                   checkpoint_layers=c.checkpoint_layers,
                                   gradient_accumulation_steps=c.gradient_accumulation_steps,
                                   offload_activations=c.offload_activations)


def device_for_run() -> str:
    """Where a run in this process goes: "cuda" when a GPU is there (bf16), else "cpu" (fp32)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fit(run: Run, limit: int, device: str | None = None) -> Fit:
    """The fastest way predicted to fit ``run`` into ``limit`` bytes, keeping its effective batch.

    Raises `MemoryLimitTooSmall` when nothing fits, or when the plan cannot estimate this strategy on this model.
    """
    from ..distributed import launched_processes
    from .memory import estimate, strategy_memory
    from .skeleton import model_shape, run_shape

    s = run.spec
    device = device or device_for_run()
    processes = launched_processes()  # each process fits its own part: its rows, its shard
    effective = s.batch_size * s.gradient_accumulation_steps
    labels = run.dataset.labels if run.dataset is not None else []
    shape = model_shape(s.model, run.task, device, len(labels) or 2)
    usable = int(limit * (1 - HEADROOM))
    layers = shape.num_layers
    can_checkpoint = traits(run.strategy).supports_gradient_checkpointing
    asked_run = run_shape(s, run.task, run.quantization, device)
    part = strategy_memory(run.strategy, shape, run.config, asked_run) \
        if shape.family is not None else None  # else each candidate's estimate says why there is none
    recompute = CHECKPOINTING_COST.get(part.gradient_flow, CHECKPOINTING_COST["inputs"]) if part else 0.0
    offloading = [True] if s.offload_activations else [False, True] if device == "cuda" else [False]

    def candidate(m: int, n: int, off: bool) -> Candidate:
        k = effective // m
        shape_of_run = run_shape(s, run.task, run.quantization, device, batch_size=m, gradient_checkpointing=n > 0,
                                 checkpoint_layers=n if 0 < n < layers else None, offload_activations=off,
                                 processes=processes)
        plan = estimate(shape, run.strategy, run.config, shape_of_run)
        if plan.status != "ok":
            raise Unpredictable(
                f"--memory-limit: the planner cannot predict {run.strategy.name} on {s.model} ({plan.message}), "
                "so it cannot fit the run. Drop --memory-limit and set --batch-size and "
                "--gradient-checkpointing yourself.", run.strategy, run.quantization)
        peak = plan.peak_bytes if k == 1 else _accumulating_peak(plan, shape, run, shape_of_run)
        cost = 1 + recompute * n / max(layers, 1) + OFFLOAD_COST * off
        time = k * (cost * m * s.seq_len + MICRO_STEP_TOKENS[device])
        return Candidate(m, k, n > 0, shape_of_run.checkpoint_layers, off, peak, round(time, 1), peak <= usable)

    candidates = []
    # In backward, each weight steps as its gradient is whole: one micro-batch a step (rules.in_backward_refusal).
    smallest = effective if s.optimizer_in_backward else 1
    for m in (d for d in range(effective, smallest - 1, -1) if effective % d == 0):
        for off in offloading:
            if s.gradient_checkpointing:  # as asked
                candidates.append(candidate(m, asked_run.checkpointed_layers(layers), off))
            elif not can_checkpoint or layers < 1:
                candidates.append(candidate(m, 0, off))
            else:
                candidates.extend(_by_layers(functools.partial(candidate, m, off=off), layers))
    asked = {"batch_size": s.batch_size, "gradient_accumulation_steps": s.gradient_accumulation_steps,
             "gradient_checkpointing": s.gradient_checkpointing, "checkpoint_layers": s.checkpoint_layers,
             "offload_activations": s.offload_activations}
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise MemoryLimitTooSmall(_too_small(run, limit, candidates, device), run.strategy, run.quantization)
    chosen = min(fitting, key=_rank)
    return Fit(limit, usable, device, effective, asked, chosen, _reason(chosen, candidates, usable),
               candidates)


def _by_layers(candidate: Any, layers: int) -> list[Candidate]:
    """The candidates of one micro-batch and offload by how many layers they checkpoint: none, every one, and
    between them the fewest that fits (bisected, the peak falling as more are checkpointed), or when none between
    fits, all but one (the least peak between)."""
    none, every = candidate(0), candidate(layers)
    if none.fits or layers < 2:
        return [none, every]
    low, high = 1, layers - 1  # the answer, if any, is in [low, high]
    best = candidate(high)
    if not best.fits:
        return [none, best, every]
    while low < high:
        middle = (low + high) // 2
        c = candidate(middle)
        if c.fits:
            best, high = c, middle
        else:
            low = middle + 1
    return [none, best, every]


def _checkpointed(c: Candidate) -> int:
    """How many layers ``c`` checkpoints, for ranking: every one counts as more than any number."""
    if not c.gradient_checkpointing:
        return 0
    return c.checkpoint_layers if c.checkpoint_layers is not None else 1 << 30


def _rank(c: Candidate) -> tuple[float, int, bool, int]:
    """The order of preference: the lowest predicted time, then fewer layers checkpointed, then no offload, then
    the larger micro-batch."""
    return c.predicted_time, _checkpointed(c), c.offload_activations, -c.batch_size


def _accumulating_peak(plan: Plan, shape: ModelShape, run: Run, shape_of_run: RunShape) -> int:
    """The peak of a micro-step after the first: the plan's phases before the gradients exist (forward, loss,
    layers' backward) now hold every gradient of the earlier micro-batches, and adding a new gradient into them
    holds one more gradient tensor at a time (at most the largest).

    The phases without gradients are the plan's phases with nothing trainable: their largest, plus what the run
    holds outside them and the gradients, is that micro-step's peak."""
    from .memory import peak, strategy_memory

    part = strategy_memory(run.strategy, shape, run.config, shape_of_run)
    static = sum(plan.components[k] for k in (*STATIC_COMPONENTS, "runtime_overhead"))
    without = dataclasses.replace(part, trainable_bytes=0, largest_trainable_tensor_bytes=0, optimizer_state_bytes=0)
    components, _ = peak(shape, shape_of_run, without)
    phase = sum(v for k, v in components.items() if k not in (*STATIC_COMPONENTS, "runtime_overhead"))
    return max(plan.peak_bytes, static + part.trainable_bytes + phase) + part.largest_trainable_tensor_bytes


def fit_spec(run: Run, limit: int) -> Run:
    """``run`` with its spec fitted into ``limit`` bytes and the fit recorded (`Run.fit`)."""
    chosen = fit(run, limit)
    return dataclasses.replace(run, spec=chosen.apply(run.spec), fit=chosen.to_dict())


def _ways(c: Candidate) -> str:
    """Checkpointing and offload, in words."""
    return _checkpointing(c, "with", "without") + (", activations offloaded" if c.offload_activations else "")


def _checkpointing(c: Candidate, with_: str, without: str) -> str:
    if not c.gradient_checkpointing:
        return f"{without} gradient checkpointing"
    if c.checkpoint_layers is None:
        return f"{with_} gradient checkpointing"
    return f"{with_} gradient checkpointing of the first {c.checkpoint_layers} layers"


def _reason(chosen: Candidate, candidates: list[Candidate], usable: int) -> str:
    """Why ``chosen``, in a sentence: what it is, its predicted peak, and a faster way that does not fit."""
    what = (f"micro-batch {chosen.batch_size} x {chosen.gradient_accumulation_steps} accumulation {_ways(chosen)}, "
            f"predicted to peak at {format_bytes(chosen.predicted_peak_bytes)} of the {format_bytes(usable)} usable")
    before = [c for c in candidates if _rank(c) < _rank(chosen)]
    if not before:
        return f"{what}: the fastest way predicted, and it fits"
    best = min(before, key=_rank)
    return (f"{what}; the ways ranked before it (faster, or as fast with a larger micro-batch) do not fit, e.g. "
            f"micro-batch {best.batch_size} {_ways(best)} at "
            f"{format_bytes(best.predicted_peak_bytes)}")


def _too_small(run: Run, limit: int, candidates: list[Candidate], device: str) -> str:
    """The error when nothing fits: the limit, the smallest predicted peak, and the smallest limit that fits it."""
    s = run.spec
    least = min(candidates, key=lambda c: c.predicted_peak_bytes)
    needed = math.ceil(least.predicted_peak_bytes / (1 - HEADROOM) / 2**20)
    how = (f"micro-batch {least.batch_size} x {least.gradient_accumulation_steps}"
           f"{_checkpointing(least, ' and', '') if least.gradient_checkpointing else ''}"
           f"{' and activations offloaded' if least.offload_activations else ''}")
    predicted = format_bytes(least.predicted_peak_bytes)
    return (f"--memory-limit {s.memory_limit or format_bytes(limit)} is too small for {run.strategy.name} on "
            f"{s.model} at --seq-len {s.seq_len} ({device}): its least predicted peak is {predicted}, with {how}. "
            f"Give --memory-limit {needed}MiB or more.")

