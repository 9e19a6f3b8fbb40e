"""Measure one case in this process: the worker's job.

It opens the run's training session (`adapters.training.Session`), the one `adapters train` steps, and steps it as
train does, on the run's own batches (packing, padding trimmed, accumulation included): so what is measured is what
train runs. It times the steps, splits the memory peak into its parts, and, on a GPU, adds MFU and energy; then,
with more than one repeat, loads again (`Measurement.loads`), so the report holds the load time's own spread;
optionally held-out quality over a short real training.
"""
from __future__ import annotations

import dataclasses
import gc
import resource
import statistics
import time

import torch

from ..contract import traits
from ..distributed import is_sharded
from ..errors import AdaptersError
from ..nn import ParameterCount, trainable_parameters
from ..reports.model import Engine, Memory, MemoryComponents, OkResult, Quality, StepTimes
from ..resolver import resolve
from ..runspec import Run, RunSpec
from ..text import parse_size
from ..training import Session, build, finite_loss, tokens_of, train
from ..training.result import engine_now
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


class _Steps:
    """A session's optimizer steps, one after another on its batches from the first: each one's loss (read back,
    which waits for the step to end) and real tokens."""

    def __init__(self, session: Session) -> None:
        from ..checkpoints import Position

        self.session = session
        self.position = Position.start()
        self.batches = session.batches(self.position)
        self.fewest_rows = session.run.spec.batch_size  # of a micro-batch drawn: fewer when the data has fewer rows

    def __call__(self) -> tuple[float, int]:
        return self.run(next(self.batches))

    def run(self, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """The next step, on ``batches`` (drawn from `batches`)."""
        self.fewest_rows = min(self.fewest_rows, *(int(b["input_ids"].shape[0]) for b in batches))
        self.position.step += 1
        done = self.session.stepper.step(batches, self.position.step)
        if done is None:
            raise torch.OutOfMemoryError(self.session.stepper.failure)
        return finite_loss(done[0].item(), self.position.step), int(tokens_of(batches))


def measure(spec: RunSpec, measurement: Measurement) -> OkResult:
    """Load, apply, time and measure the run ``spec`` in this process; the result as the report holds it."""
    run = resolve(spec)
    cuda = torch.cuda.is_available()
    if cuda:
        _prepare_gpu(measurement.memory_limit)
    session = Session.open(run)
    steps = _Steps(session)
    before = _checksums(session.built.model)
    warmup_s = _warm_up(steps, measurement.warmup, session.compiled["layers"])
    nvml = _Nvml() if cuda else None
    energy_start = nvml.energy_mj() if nvml else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses, tokens = _time_steps(steps, measurement, cuda)
    energy_end = nvml.energy_mj() if nvml else None
    step_s = _step_times(times)
    per_step = sum(tokens) / len(tokens)  # the real tokens of a timed step, padding left out, as train counts them
    engine = engine_now(session, session.unwrapped())
    result = OkResult(
        strategy=run.spec.strategy, name=run.strategy.name, quantization=run.quantization, task=run.task,
        load_s=session.built.load_s, load_s_repeats=[session.built.load_s],  # the first in a fresh process
        step_s=step_s, steps_run=len(warmup_s) + measurement.steps * measurement.repeats,
        tokens_per_step=round(per_step), tokens_per_s=per_step / step_s.median,
        # What the row really ran with: a row that backed off after running out of memory says so (compare checks).
        batch_size=session.stepper.micro_batch, gradient_accumulation_steps=session.stepper.accumulation,
        trainable_parameters=session.parameters.trainable, declared_trainable_parameters=session.built.declared,
        total_parameters=session.parameters.total, final_loss=losses[-1],
        memory=_memory(session, steps, cuda, nvml), flags=_flags(session, steps, before), quality=None,
        mfu=_mfu(run, session.parameters, per_step / step_s.median) if cuda else None,
        energy_j_per_token=(energy_end - energy_start) / 1000 / sum(tokens)
        if energy_start is not None and energy_end is not None else None,
        # Compile time, apart from step time: the first step's seconds beyond a compiled step's (None: not compiled).
        compiled_layers=session.compiled["layers"],
        compile_s=max(0.0, warmup_s[0] - step_s.median) if session.compiled["layers"] else None,
        memory_fit=run.fit, loss_path=engine["loss_path"], engine=Engine(**engine))
    device = session.accelerator.device
    del session, steps  # free its memory before the model loads again
    _load_again(run, device, measurement.loads - 1, result)
    if measurement.quality_steps:
        result.quality, quality_flags = _quality(spec, measurement.quality_steps)
        result.flags.extend(quality_flags)
    return result


def _warm_up(steps: _Steps, warmup: int, compiled_layers: int) -> list[float]:
    """Untimed steps, their seconds; with compiled layers at least one step, the first, which compiles them."""
    seconds = []
    for _ in range(max(warmup, 1 if compiled_layers else 0)):
        start = time.perf_counter()
        steps()
        seconds.append(time.perf_counter() - start)
    return seconds


def _prepare_gpu(memory_limit: str | None) -> None:
    if torch.cuda.memory_allocated() > 0:
        raise AdaptersError("the GPU already holds memory before loading; measurements would be wrong.")
    if memory_limit:  # past the limit, a real out-of-memory error
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_size(memory_limit) / total))


def _load_again(run: Run, device: torch.device, times: int, result: OkResult) -> None:
    """Load and apply ``run`` ``times`` more in this process (warm: imports done, files cached), each one's seconds
    added to the result's ``load_s_repeats``; a load that fails (out of memory, say) ends that with a flag."""
    for _ in range(times):
        gc.collect()  # the previous copy's memory, before this one takes its own
        try:
            result.load_s_repeats.append(build(run, device).load_s)
        except Exception as exc:  # what was measured stands, without the load time's spread
            result.flags.append(f"loading again failed, so load time has no spread: {type(exc).__name__}: "
                                f"{exc}"[:300])
            return
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _time_steps(steps: _Steps, measurement: Measurement,
                cuda: bool) -> tuple[list[list[float]], list[float], list[int]]:
    """Seconds of each timed step, per repeat, and every step's loss and real tokens."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: list[list[float]] = []
    losses: list[float] = []
    tokens: list[int] = []
    for _ in range(measurement.repeats):
        repeat = []
        for _ in range(measurement.steps):
            sync()
            start = time.perf_counter()
            loss, count = steps()
            sync()
            repeat.append(time.perf_counter() - start)
            losses.append(loss)
            tokens.append(count)
        times.append(repeat)
    return times, losses, tokens


def _step_times(times: list[list[float]]) -> StepTimes:
    flat = sorted(t for repeat in times for t in repeat)
    median = statistics.median(flat)
    return StepTimes(median=median, min=flat[0], max=flat[-1], spread=(flat[-1] - flat[0]) / median,
                     repeat_medians=[statistics.median(r) for r in times])


# ------------------------------------------------------------------------------------------ memory


def _memory(session: Session, steps: _Steps, cuda: bool, nvml: _Nvml | None) -> Memory:
    """The step's peak, split into what is held outside the step and the step's own activations. On the CPU, the
    profiler watches one more step, on a batch drawn before it (as the loader's worker would have it ready)."""
    static = static_components(session.model, session.optimizer)
    gradients = static["trainable_parameters"]  # at the backward peak, every trainable weight has its gradient
    if cuda:
        peak, source = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    else:
        batches = next(steps.batches)
        if is_sharded(session.model):  # what the step allocates, over what it uses from before (see the profiler)
            held = sum(static.values()) + _tensor_bytes([t for b in batches for t in b.values()])
            peak = held + cpu_peak_allocated_bytes(lambda: steps.run(batches))
        else:
            peak = cpu_peak_tensor_bytes(lambda: steps.run(batches))
        source = "cpu_profiler_allocation_events"
    components = {**static, "gradients": gradients}
    components["activations_and_temporaries"] = peak - sum(components.values())
    return Memory(peak_bytes=peak, source=source, components=MemoryComponents(**components),
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
                  reserved_bytes=torch.cuda.max_memory_reserved() if cuda else None,
                  nvml_used_bytes=nvml.used_bytes() if nvml else None)


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


def _flags(session: Session, steps: _Steps, before: dict[str, tuple[float, float]]) -> list[str]:
    """What looks wrong: weights that did not train, a trainable count unlike the declared one, batches smaller than
    asked, a back-off."""
    flags = [] if _checksums(session.built.model) != before else ["trainable weights unchanged after training"]
    if steps.fewest_rows < session.run.spec.batch_size:
        flags.append(f"the data has fewer rows than --batch-size {session.run.spec.batch_size}: steps drew batches of "
                     f"{steps.fewest_rows}, as train would")
    if session.stepper.backoffs:  # as train would have: the row says what it really ran with, and compare checks it
        s, last = session.run.spec, session.stepper.backoffs[-1]
        flags.append(f"backed off after running out of memory: micro-batch {s.batch_size} x "
                     f"{s.gradient_accumulation_steps} -> {last['batch_size']} x {last['gradient_accumulation_steps']}")
    trainable, declared = session.parameters.trainable, session.built.declared
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


def _quality(spec: RunSpec, steps: int) -> tuple[Quality, list[str]]:
    """Held-out quality before and after ``steps`` training steps on the built-in real data."""
    result = train(dataclasses.replace(spec, max_steps=steps), progress=False)
    if result.status != "completed":
        return (Quality(steps=steps, status="failed", message=result.reason),
                [f"quality run {result.status}: {result.reason}"])
    flags = []
    before, after = result.before.get("loss"), result.after.get("loss")
    if len(result.losses) > 1 and before is not None and after is not None and after >= before:
        flags.append("held-out loss did not decrease over the quality steps")
    quality = Quality(steps=steps, status="ok", before=result.before, after=result.after, losses=result.losses)
    backoffs = result.backoffs
    if backoffs:  # out of memory: the quality run went on with a smaller micro-batch; compare must know
        quality.batch_size, quality.gradient_accumulation_steps = (backoffs[-1]["batch_size"],
                                                                   backoffs[-1]["gradient_accumulation_steps"])
        flags.append(f"quality run backed off after running out of memory: micro-batch {spec.batch_size} x "
                     f"{spec.gradient_accumulation_steps} -> {quality.batch_size} x "
                     f"{quality.gradient_accumulation_steps}")
    return quality, flags
