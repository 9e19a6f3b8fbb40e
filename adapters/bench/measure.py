"""Measure one case in this process: the worker's job.

It reuses the training pipeline (`adapters.training.build`, `training_step`), so what is measured is
what `adapters train` runs: load and apply, then time the steps, split the memory peak into its
parts, and, on a GPU, add MFU and energy; then, with more than one repeat, load again
(`Measurement.loads`), so the report holds the load time's own spread; optionally held-out quality
over a short real training.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..contract import traits
from ..errors import AdaptersError, TrainingFailed
from ..loss import loss_path
from ..nn import ParameterCount, count_parameters, trainable_parameters
from ..runspec import Run, RunSpec, resolve
from ..text import parse_size
from .profiler import cpu_peak_allocated_bytes, cpu_peak_tensor_bytes
from .settings import Measurement

# Dense bf16 peak FLOP/s per GPU, for MFU (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
                   "RTX 4090": 165e12, "B200": 2250e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name, or None when unknown."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if key.lower() in device_name.lower():
            return flops
    return None


@dataclass
class _Training:
    """A model ready to step on one fixed batch."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict[str, torch.Tensor]
    step: Callable[[int], torch.Tensor]  # one training step (its number) -> the loss
    load_s: float
    params: ParameterCount
    declared: int | None  # the trainable count the strategy declared, if it does
    device: torch.device
    compiled_layers: int = 0  # decoder layers compiled (--compile); 0: none


def measure(spec: RunSpec, measurement: Measurement) -> dict[str, Any]:
    """Load, apply, time and measure the run ``spec`` in this process; the result as the report holds it."""
    run = resolve(spec)
    cuda = torch.cuda.is_available()
    if cuda:
        _prepare_gpu(measurement.memory_limit)
    training = _set_up(run)
    before = _checksums(training.model)
    # Untimed warm-up; with --compile at least one step, the first, which compiles the layers.
    warmup_s = []
    for i in range(max(measurement.warmup, 1 if training.compiled_layers else 0)):
        start = time.perf_counter()
        _finite(training.step(i + 1).item(), i + 1)  # reading the loss waits for the step to end
        warmup_s.append(time.perf_counter() - start)
    nvml = _Nvml() if cuda else None
    energy_start = nvml.energy_mj() if nvml else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = _time_steps(training.step, measurement, cuda)
    energy_end = nvml.energy_mj() if nvml else None
    result = _result(run, measurement, training, times, losses)
    # Compile time, apart from step time: the first step's seconds beyond a compiled step's (None: not compiled).
    result["compiled_layers"] = training.compiled_layers
    result["steps_run"] = len(warmup_s) + measurement.steps * measurement.repeats
    result["compile_s"] = max(0.0, warmup_s[0] - result["step_s"]["median"]) if training.compiled_layers else None
    result["memory"] = _memory(training, cuda, nvml)
    result["flags"] = _flags(training, before)
    if cuda:
        timed_tokens = result["tokens_per_step"] * measurement.steps * measurement.repeats
        result["mfu"] = _mfu(run, training.params, result["tokens_per_s"])
        if energy_start is not None and energy_end is not None:
            result["energy_j_per_token"] = (energy_end - energy_start) / 1000 / timed_tokens
    device = training.device
    del training  # free its memory before the model loads again
    for _ in range(measurement.loads - 1):
        try:
            result["load_s_repeats"].append(_load_again(run, device))
        except Exception as exc:  # e.g. out of memory: what was measured stands, without the load time's spread
            result["flags"].append(f"loading again failed, so load time has no spread: {type(exc).__name__}: "
                                   f"{exc}"[:300])
            break
    if measurement.quality_steps:
        result["quality"], quality_flags = _quality(spec, measurement.quality_steps)
        result["flags"].extend(quality_flags)
    return result


def _prepare_gpu(memory_limit: str | None) -> None:
    if torch.cuda.memory_allocated() > 0:
        raise AdaptersError("the GPU already holds memory before loading; measurements would be wrong.")
    if memory_limit:  # past the limit, a real out-of-memory error
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_size(memory_limit) / total))


def _set_up(run: Run) -> _Training:
    """Load and apply the strategy, and put the model, its optimizer and one batch on the device."""
    from ..engine import compile_by_default, compile_layers, make_optimizer
    from ..training import build, make_accelerator, make_batches, optimizer_step

    accelerator = make_accelerator(sharding=run.spec.sharding)
    start = time.perf_counter()
    base, model, declared = build(run, accelerator.device)
    load_s = time.perf_counter() - start
    params = count_parameters(model)
    data = make_batches(run.dataset.train, base, run.spec.seq_len, "train")
    # The asked batch shape, whatever the data's size: short data repeats its rows (memory and
    # speed do not depend on the values; a silently smaller batch would be measured wrongly).
    # A step of micro-batches (--memory-limit may fit the batch into several): all of its rows, in micro-batches.
    rows = torch.arange(run.spec.batch_size * run.spec.gradient_accumulation_steps) % len(data)
    batch = {k: v[rows] for k, v in data.tensors.items()}
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], run.learning_rate,
                               run.weight_decay, accelerator.device)
    on = run.spec.compile if run.spec.compile is not None else compile_by_default(accelerator.device)
    compiled = compile_layers(model) if on else 0
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    model.train()

    def step(i: int) -> torch.Tensor:
        return optimizer_step(model, [batch], optimizer, accelerator, step=i, micro_batch=run.spec.batch_size,
                              loss_chunk=run.spec.loss_chunk)[0]

    return _Training(model, optimizer, batch, step, load_s, params, declared, accelerator.device, compiled)


def _load_again(run: Run, device: torch.device) -> float:
    """Seconds to load and apply ``run`` once more in this process (warm: imports done, files cached)."""
    from ..training import build

    gc.collect()  # the previous copy's memory, before this one takes its own
    start = time.perf_counter()
    loaded = build(run, device)
    seconds = time.perf_counter() - start
    del loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return seconds


def _time_steps(step: Callable[[int], torch.Tensor], measurement: Measurement,
                cuda: bool) -> tuple[list[list[float]], list[float]]:
    """Seconds of each timed step, per repeat, and every step's loss."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: list[list[float]] = []
    losses: list[float] = []
    for _ in range(measurement.repeats):
        repeat = []
        for i in range(measurement.steps):
            sync()
            start = time.perf_counter()
            losses.append(_finite(step(i + 1).item(), i + 1))
            sync()
            repeat.append(time.perf_counter() - start)
        times.append(repeat)
    return times, losses


def _finite(loss: float, step: int) -> float:
    """``loss``, read after its step as timing needs anyway (the step itself does not synchronise); `TrainingFailed`
    when it is not finite."""
    if not math.isfinite(loss):
        raise TrainingFailed(f"loss became {loss} at step {step}; stopped and saved nothing. Lower --learning-rate, "
                             "or check the data.")
    return loss


def _result(run: Run, measurement: Measurement, training: _Training, times: list[list[float]],
            losses: list[float]) -> dict[str, Any]:
    """The result's identity, timings and counts; memory, flags and the GPU's numbers are added after."""
    flat = sorted(t for repeat in times for t in repeat)
    median = statistics.median(flat)
    batch = training.batch
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return {
        "strategy": run.spec.strategy,
        "name": run.strategy.name,
        "quantization": run.quantization,
        "task": run.task,
        "status": "ok",
        "message": None,
        "load_s": training.load_s,
        "load_s_repeats": [training.load_s],  # every load's seconds, the first (load_s) in a fresh process
        "step_s": {"median": median, "min": flat[0], "max": flat[-1], "spread": (flat[-1] - flat[0]) / median,
                   "repeat_medians": [statistics.median(r) for r in times]},
        "steps_run": measurement.warmup + measurement.steps * measurement.repeats,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / median,
        # What the row really ran with: bench never backs off, but a row that did must say so (compare checks it).
        "batch_size": run.spec.batch_size,
        "gradient_accumulation_steps": run.spec.gradient_accumulation_steps,
        "memory_fit": run.fit,  # --memory-limit: what the plan chose and why; None when not fitted
        "loss_path": loss_path(training.model, run.spec.loss_chunk) if run.task == "causal-lm" else "model",
        "trainable_parameters": training.params.trainable,
        "declared_trainable_parameters": training.declared,
        "total_parameters": training.params.total,
        "final_loss": losses[-1],
        "memory": None,
        "mfu": None,
        "energy_j_per_token": None,
        "quality": None,
        "flags": [],
    }


# ------------------------------------------------------------------------------------------ memory


def _memory(training: _Training, cuda: bool, nvml: _Nvml | None) -> dict[str, Any]:
    """The step's peak, split into what is held outside the step and the step's own activations."""
    from ..sharding import is_sharded

    static = static_components(training.model, training.optimizer)
    gradients = static["trainable_parameters"]  # at the backward peak, every trainable weight has its gradient
    if cuda:
        peak, source = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    elif is_sharded(training.model):  # what the step allocates, over what it uses from before (see the profiler)
        before = sum(static.values()) + _tensor_bytes(list(training.batch.values()))
        peak, source = before + cpu_peak_allocated_bytes(lambda: training.step(0)), "cpu_profiler_allocation_events"
    else:
        peak, source = cpu_peak_tensor_bytes(lambda: training.step(0)), "cpu_profiler_allocation_events"
    components = {**static, "gradients": gradients}
    components["activations_and_temporaries"] = peak - sum(components.values())
    return {
        "peak_bytes": peak,
        "source": source,
        "components": components,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "nvml_used_bytes": nvml.used_bytes() if nvml else None,
    }


def static_components(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held outside the step: frozen base weights (quantized or not), trainable weights, optimizer state."""
    quantized, plain, trainable = [], [], []
    for param in model.parameters():
        if param.requires_grad:
            trainable.append(param)
        elif param.dtype in (torch.uint8, torch.int8):
            quantized.append(param)
            quantized.extend(_quantization_constants(param))
        else:
            plain.append(param)
    plain.extend(model.buffers())
    opt_state = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return {
        "base_weights_quantized": _tensor_bytes(quantized),
        "base_weights_unquantized": _tensor_bytes(plain),
        "trainable_parameters": _tensor_bytes(trainable),
        "optimizer_state": _tensor_bytes(opt_state),
    }


def _quantization_constants(param: torch.Tensor) -> list[torch.Tensor]:
    """bitsandbytes' scales and double-quantization constants that belong to a packed weight."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        nested = getattr(state, "state2", None)
        tensors = [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
        return tensors + ([t for t in vars(nested).values() if isinstance(t, torch.Tensor)] if nested else [])
    scb = getattr(param, "SCB", None)
    return [scb] if isinstance(scb, torch.Tensor) else []


def _tensor_bytes(tensors: list[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared storages count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor (--sharding fsdp): this process's shard
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# ------------------------------------------------------------------------------- checks and the GPU


def _checksums(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    return {n: (float(p.detach().double().sum()), float(p.detach().double().abs().sum()))
            for n, p in trainable_parameters(model)}


def _flags(training: _Training, before: dict[str, tuple[float, float]]) -> list[str]:
    """What looks wrong: weights that did not train, a trainable count unlike the declared one."""
    flags = [] if _checksums(training.model) != before else ["trainable weights unchanged after training"]
    trainable, declared = training.params.trainable, training.declared
    if declared is not None and declared != trainable:
        flags.append(f"trainable count {trainable:,} disagrees with the strategy's declared {declared:,}")
    return flags


def _mfu(run: Run, params: ParameterCount, tokens_per_s: float) -> float | None:
    """Model FLOP utilization against the GPU's dense bf16 peak, when the GPU is known."""
    flops = peak_bf16_flops(torch.cuda.get_device_name())
    if not flops:
        return None
    base_params = params.total - params.trainable if params.trainable < params.total else params.total
    return traits(run.strategy).flops_per_token_factor * base_params * tokens_per_s / flops


class _Nvml:
    """The current GPU through NVML: its energy counter and used memory, where the driver reports them."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # no NVML, no driver, or no permission: those numbers are simply absent
            self._nvml = self._handle = None

    def energy_mj(self) -> float | None:
        """Total energy in millijoules since the driver loaded."""
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) if self._handle else None
        except Exception:  # a GPU without an energy counter
            return None

    def used_bytes(self) -> int | None:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used if self._handle else None


def _quality(spec: RunSpec, steps: int) -> tuple[dict[str, Any], list[str]]:
    """Held-out quality before and after ``steps`` training steps on the built-in real data."""
    from ..trainer import train

    result = train(dataclasses.replace(spec, max_steps=steps), progress=False)
    if result.status != "completed":
        return ({"steps": steps, "status": "failed", "message": result.reason},
                [f"quality run {result.status}: {result.reason}"])
    flags = []
    before, after = result.before.get("loss"), result.after.get("loss")
    if len(result.losses) > 1 and before is not None and after is not None and after >= before:
        flags.append("held-out loss did not decrease over the quality steps")
    quality = {"steps": steps, "status": "ok", "before": result.before, "after": result.after, "losses": result.losses}
    backoffs = result.backoffs
    if backoffs:  # out of memory: the quality run went on with a smaller micro-batch; compare must know
        batch, accumulation = backoffs[-1]["batch_size"], backoffs[-1]["gradient_accumulation_steps"]
        quality.update(batch_size=batch, gradient_accumulation_steps=accumulation)
        flags.append(f"quality run backed off after running out of memory: micro-batch {spec.batch_size} x "
                     f"{spec.gradient_accumulation_steps} -> {batch} x {accumulation}")
    return quality, flags
