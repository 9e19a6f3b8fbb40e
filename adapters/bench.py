"""Benchmark strategies for memory and speed, each in a fresh subprocess, into a JSON report.

Each strategy runs in its own process, so peak memory and allocator state never bleed between
strategies, and one that fails (out of memory, an error, a refusal) is recorded while the rest go
on. The worker reuses the training pipeline (`adapters.train.build`, `training_step`), so what is
measured is what `adapters train` runs.

Run as a module, this file is the worker: ``python -m adapters.bench CASE.json RESULT.json``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdaptersError, TrainingFailed
from .options import read_toml, settings_values
from .reports import SCHEMA_VERSION
from .files import write_json
from .store import package_versions
from .text import aligned_table


@dataclass
class BenchSettings:
    """What `adapters bench` runs; suite files (TOML) use the same keys."""

    model: str = "smollm2-135m"
    strategies: list[str] = field(
        default_factory=lambda: ["lora", "lora@nf4", "prefix-tuning", "linear-probe", "full-finetune"]
    )
    task: str | None = None
    batch_size: int = 2
    seq_len: int = 128
    steps: int = 3  # timed steps per repeat
    warmup: int = 1  # untimed steps before the first repeat
    repeats: int = 1
    gradient_checkpointing: bool = False
    seed: int = 0
    quality_steps: int = 0  # >0: held-out quality before and after this many steps on real data
    find_max: str | None = None  # "batch_size" or "seq_len": search for the largest that runs
    memory_limit: str | None = None  # e.g. "4GiB": a try over it fails (required on the CPU for a search)
    output: str | None = None


def settings_from(suite: str | None, given: dict[str, Any]) -> BenchSettings:
    """Settings from a suite file, overridden by ``given`` (the flags a user typed)."""
    values = settings_values(read_toml(suite), BenchSettings, f"--suite {suite}") if suite else {}
    values.update(given)
    settings = BenchSettings(**values)
    for name in ("batch_size", "seq_len", "steps", "repeats"):
        if getattr(settings, name) < 1:
            raise AdaptersError(f"--{name.replace('_', '-')} must be at least 1.")
    if settings.warmup < 0:
        raise AdaptersError("--warmup must be 0 or more.")
    if settings.find_max not in (None, "batch_size", "seq_len"):
        raise AdaptersError(f"find_max = {settings.find_max!r}: use batch_size or seq_len.")
    if settings.memory_limit is not None:
        from .plan import parse_size

        if not settings.find_max:
            raise AdaptersError("--memory-limit bounds a capacity search: add --find-max-batch or --find-max-seq-len.")
        parse_size(settings.memory_limit)
    return settings


def _train_settings(settings: BenchSettings, strategy: str):
    from .runspec import RunSpec

    return RunSpec(model=settings.model, strategy=strategy, task=settings.task,
                         batch_size=settings.batch_size, seq_len=settings.seq_len,
                         gradient_checkpointing=settings.gradient_checkpointing, seed=settings.seed)


# Dense bf16 peak FLOP/s per GPU, for MFU (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
                   "RTX 4090": 165e12, "B200": 2250e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name, or None when unknown."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if key.lower() in device_name.lower():
            return flops
    return None


def _checksums(model) -> dict[str, tuple[float, float]]:
    from .nn import trainable_parameters

    return {n: (float(p.detach().double().sum()), float(p.detach().double().abs().sum()))
            for n, p in trainable_parameters(model)}


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def static_components(model, optimizer) -> dict[str, int]:
    """Bytes held outside the step: frozen base weights (quantized or not), trainable weights, optimizer state."""
    import torch

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


def _quantization_constants(param) -> list:
    """bitsandbytes' scales and double-quantization constants that belong to a packed weight."""
    import torch

    state = getattr(param, "quant_state", None)
    if state is not None:
        nested = getattr(state, "state2", None)
        tensors = [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
        return tensors + ([t for t in vars(nested).values() if isinstance(t, torch.Tensor)] if nested else [])
    scb = getattr(param, "SCB", None)
    return [scb] if isinstance(scb, torch.Tensor) else []


def cpu_peak_tensor_bytes(step) -> int:
    """Peak bytes of live CPU tensors during ``step()``, from the profiler's allocation events.

    Tensors that exist before the step and are used in it (weights, optimizer state) count from
    the start, so the result is the step's whole peak, not only what it allocates.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    live = peak = 0
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action in (Action.PREEXISTING, Action.CREATE):
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        import torch

        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    except Exception:  # no NVML, no driver, or no permission: those numbers are simply absent
        return None, None


def measure(settings: BenchSettings, strategy: str) -> dict[str, Any]:
    """Load, apply, time and measure one strategy in this process (the worker's job)."""
    import torch

    from .contract import traits
    from .nn import count_parameters
    from .runspec import resolve
    from .train import build, make_accelerator, make_batches, training_step

    run = resolve(_train_settings(settings, strategy))
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda and torch.cuda.memory_allocated() > 0:
        raise AdaptersError("the GPU already holds memory before loading; measurements would be wrong.")
    if cuda and settings.memory_limit:  # a real out-of-memory error past the limit
        from .plan import parse_size

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_size(settings.memory_limit) / total))
    accelerator = make_accelerator()
    start = time.perf_counter()
    base, model, declared = build(run, accelerator.device)
    load_s = time.perf_counter() - start
    params = count_parameters(model)
    data = make_batches(run.dataset.train, base, settings.seq_len, "train")
    # The asked batch shape, whatever the data's size: short data repeats its rows (memory and
    # speed do not depend on the values; a silently smaller batch would be measured wrongly).
    rows = torch.arange(settings.batch_size) % len(data)
    batch = {k: v[rows] for k, v in data.tensors.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    model.train()
    before = _checksums(model)
    step = lambda i: training_step(model, batch, optimizer, accelerator, i)  # noqa: E731
    for i in range(settings.warmup):
        step(i + 1)
    nvml, handle = _nvml() if cuda else (None, None)
    energy_start = _energy(nvml, handle)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    times: list[list[float]] = []
    losses = []
    for _ in range(settings.repeats):
        repeat = []
        for i in range(settings.steps):
            sync()
            t = time.perf_counter()
            losses.append(step(i + 1).item())
            sync()
            repeat.append(time.perf_counter() - t)
        times.append(repeat)
    energy_end = _energy(nvml, handle)
    flat = sorted(t for r in times for t in r)
    median = statistics.median(flat)
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    static = static_components(model, optimizer)
    gradients = static["trainable_parameters"]  # at the backward peak, every trainable weight has its gradient
    if cuda:
        peak, source = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    else:
        peak, source = cpu_peak_tensor_bytes(lambda: step(0)), "cpu_profiler_allocation_events"
    components = {**static, "gradients": gradients}
    components["activations_and_temporaries"] = peak - sum(components.values())
    changed = _checksums(model) != before
    flags = [] if changed else ["trainable weights unchanged after training"]
    if declared is not None and declared != params.trainable:
        flags.append(f"trainable count {params.trainable:,} disagrees with the strategy's declared {declared:,}")
    n_steps = settings.warmup + settings.steps * settings.repeats
    result: dict[str, Any] = {
        "strategy": strategy,
        "name": run.strategy.name,
        "quantization": run.quantization,
        "task": run.task,
        "status": "ok",
        "message": None,
        "load_s": load_s,
        "step_s": {"median": median, "min": flat[0], "max": flat[-1], "spread": (flat[-1] - flat[0]) / median,
                   "repeat_medians": [statistics.median(r) for r in times]},
        "steps_run": n_steps,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / median,
        "trainable_parameters": params.trainable,
        "declared_trainable_parameters": declared,
        "total_parameters": params.total,
        "final_loss": losses[-1],
        "memory": {
            "peak_bytes": peak,
            "source": source,
            "components": components,
            "peak_rss_bytes": _peak_rss(),
            "reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
            "nvml_used_bytes": nvml.nvmlDeviceGetMemoryInfo(handle).used if handle else None,
        },
        "mfu": None,
        "energy_j_per_token": None,
        "quality": None,
        "flags": flags,
    }
    if cuda:
        flops = peak_bf16_flops(torch.cuda.get_device_name())
        if flops:
            base_params = params.total - params.trainable if params.trainable < params.total else params.total
            factor = traits(run.strategy).flops_per_token_factor
            result["mfu"] = factor * base_params * result["tokens_per_s"] / flops
        if energy_start is not None and energy_end is not None:
            timed_tokens = tokens * settings.steps * settings.repeats
            result["energy_j_per_token"] = (energy_end - energy_start) / 1000 / timed_tokens
    if settings.quality_steps:
        del model, optimizer, base
        result["quality"], quality_flags = _quality(settings, strategy)
        result["flags"].extend(quality_flags)
    return result


def _energy(nvml, handle) -> float | None:
    """Total GPU energy in millijoules since the driver loaded, where NVML reports it."""
    try:
        return float(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)) if handle else None
    except Exception:
        return None


def _quality(settings: BenchSettings, strategy: str) -> tuple[dict[str, Any], list[str]]:
    """Held-out quality before and after ``quality_steps`` steps on the built-in real data."""
    import math

    from .errors import TrainingFailed
    from .train import train

    ts = _train_settings(settings, strategy)
    ts.max_steps = settings.quality_steps
    try:
        result = train(ts, progress=False)
    except TrainingFailed as exc:
        return {"steps": settings.quality_steps, "status": "failed", "message": str(exc)}, ["non-finite loss"]
    flags = []
    if any(not math.isfinite(x) for x in result.losses):
        flags.append("non-finite loss")
    elif len(result.losses) > 1 and result.after["loss"] >= result.before["loss"]:
        flags.append("held-out loss did not decrease over the quality steps")
    return {"steps": settings.quality_steps, "status": "ok", "before": result.before, "after": result.after,
            "losses": result.losses}, flags


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _run_case(settings: BenchSettings, strategy: str) -> dict[str, Any]:
    """Run one strategy in a fresh Python process and collect its result or failure."""
    with tempfile.TemporaryDirectory(prefix="adapters-bench-") as tmp:
        case, out = Path(tmp) / "case.json", Path(tmp) / "result.json"
        case.write_text(json.dumps({"settings": asdict(settings), "strategy": strategy}))
        proc = subprocess.run([sys.executable, "-m", "adapters.bench", str(case), str(out)],
                              capture_output=True, text=True)
        if out.exists():
            return json.loads(out.read_text())
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"strategy": strategy, "status": "failed",
            "message": f"worker exited with code {proc.returncode}: {' | '.join(tail)}"}


def provenance() -> dict[str, Any]:
    """What makes a report self-describing: code, command, software and machine."""
    import torch

    root = Path(__file__).resolve().parent.parent
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain")
    from .host import distribution_of, get_registry

    plugins = {}
    for entry in get_registry().entries():
        dist, version = distribution_of(entry.plugin)
        plugins[entry.strategy.name] = f"{dist} {version}"
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(), "memory_bytes": props.total_memory}
    return {
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
        "command": sys.argv,
        "versions": {**package_versions(), "torch_cuda": torch.version.cuda},
        "plugins": plugins,
        "python": platform.python_version(),
        "os": platform.platform(),
        "cpu": {"model": _cpu_model(), "cores": os.cpu_count()},
        "gpu": gpu,
    }


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _check_strategies(settings: BenchSettings) -> None:
    """Unknown strategy names are typos: refuse them before any work starts."""
    from .host import get_registry
    from .runspec import split_strategy

    registry = get_registry()
    if not settings.strategies:
        raise AdaptersError("--strategies is empty. Name at least one, e.g. --strategies lora,full-finetune.")
    for spec in settings.strategies:
        registry.entry(split_strategy(spec, None)[0])


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _error_pct(predicted: int, measured: int) -> float | None:
    if measured == 0:
        return 0.0 if predicted == 0 else None
    return round(100 * (predicted - measured) / measured, 2)


def predict(settings: BenchSettings, result: dict[str, Any], shapes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan's prediction for a measured result, split as the measurement is, with errors in percent.

    ``shapes`` caches the model's skeleton per task across calls.
    """
    from .options import build_config
    from .plan import RunShape, estimate, model_shape
    from .host import get_registry

    shapes = {} if shapes is None else shapes
    task = result["task"]
    try:
        if task not in shapes:
            shapes[task] = model_shape(settings.model, task, _device())
        strategy = get_registry().get(result["name"])
        config = build_config(strategy.config_class, {}, strategy.name)
        run = RunShape(settings.batch_size, settings.seq_len, task, result["quantization"],
                       settings.gradient_checkpointing, _device())
        plan = estimate(shapes[task], strategy, config, run, result["strategy"])
    except Exception as exc:  # the measurement stands; a failing plan is recorded, not fatal
        return {"status": "no estimate", "message": f"planning failed: {type(exc).__name__}: {exc}"}
    if plan.status != "ok":
        return {"status": plan.status, "message": plan.message}
    predicted = plan.measured_convention()
    measured = result["memory"]["components"]
    errors = {k: _error_pct(predicted[k], measured[k]) for k in predicted}
    errors["total"] = _error_pct(plan.peak_bytes, result["memory"]["peak_bytes"])
    return {"status": "ok", "message": None, "peak_bytes": plan.peak_bytes, "phase": plan.peak_phase,
            "components": predicted, "error_pct": errors}


def run_bench(settings: BenchSettings, progress: bool = True) -> dict[str, Any]:
    """Benchmark every strategy in ``settings`` and return the report (also written to ``output``).

    With ``find_max`` set, each strategy's largest batch size or sequence length is searched by real
    runs instead, and the report's result for it is the run at that value.
    """
    import torch
    from tqdm.auto import tqdm

    from .models import resolve_model
    from .runspec import resolve

    _check_strategies(settings)
    resolve_model(settings.model)
    output = Path(settings.output) if settings.output else None
    if output is not None and output.exists():
        raise AdaptersError(f"--output {output}: exists. Choose a new file name; reports are never overwritten.")
    limit = _search_limit(settings)
    results: list[dict[str, Any]] = []
    capacity: list[dict[str, Any]] = []
    bar = tqdm(settings.strategies, desc="bench", unit="strategy", disable=not progress)
    try:
        for spec in bar:
            bar.set_postfix(strategy=spec)
            try:
                resolve(_train_settings(settings, spec))
            except AdaptersError as exc:  # e.g. full-finetune on a quantized base: recorded, not fatal
                results.append({"strategy": spec, "status": "refused", "message": str(exc)})
                continue
            if settings.find_max:
                result, search = find_capacity(settings, spec, limit, bar)
                results.append(result)
                capacity.append(search)
            else:
                results.append(_run_case(settings, spec))
    except KeyboardInterrupt:  # keep what was measured; mark the rest
        done = {r["strategy"] for r in results}
        results.extend({"strategy": spec, "status": "cancelled", "message": "interrupted by the user"}
                       for spec in settings.strategies if spec not in done)
    finally:
        bar.close()
    searches = {c["strategy"]: c for c in capacity}
    shapes: dict[str, Any] = {}
    for result in results:
        if result["status"] == "ok":  # predicted for the shape it ran: the largest found, in a search
            search = searches.get(result["strategy"])
            ran = settings if search is None else BenchSettings(**{**asdict(settings),
                                                                   settings.find_max: search["largest"]})
            result["prediction"] = predict(ran, result, shapes)
    cuda = torch.cuda.is_available()
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": {**provenance(), "seed": settings.seed},
        "settings": {**asdict(settings), "gradient_accumulation_steps": 1,
                     "effective_batch_size": settings.batch_size, "dtype": "bfloat16" if cuda else "float32",
                     "device": "cuda" if cuda else "cpu"},
        "results": results,
    }
    if settings.find_max:
        report["capacity"] = capacity
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_json(output, report)
    return report


def _search_limit(settings: BenchSettings) -> int | None:
    """The memory limit of a capacity search, in bytes; the CPU needs one to stop at."""
    from .plan import parse_size

    if not settings.find_max:
        return None
    if settings.memory_limit is None:
        if _device() == "cpu":
            raise AdaptersError(
                f"--find-max-{settings.find_max.replace('_size', '').replace('_', '-')} on the CPU needs "
                "--memory-limit (e.g. --memory-limit 4GiB): without a GPU's out-of-memory error, "
                "nothing else would stop the search."
            )
        return None
    return parse_size(settings.memory_limit)


def find_capacity(settings: BenchSettings, spec: str, limit: int | None, bar=None) -> tuple[dict, dict]:
    """The largest batch size (or sequence length, in multiples of 8) that trains under ``limit``, by real runs.

    Doubles from 1 (or 8) until a try fails (out of memory, or a measured peak over ``limit``), then
    bisects between the last success and the first failure. Every try runs in a fresh process, so
    memory is free again before the next. Returns the result at the largest working value and the
    search record, with the plan's prediction of the same largest value beside it.
    """
    from .models import model_config

    param = settings.find_max
    upper = 2**16
    if param == "seq_len":
        upper = getattr(model_config(settings.model), "max_position_embeddings", None) or upper
    tries: list[dict[str, Any]] = []
    results: dict[int, dict[str, Any]] = {}

    def works(value: int) -> bool:
        if bar is not None:
            bar.set_postfix(strategy=spec, **{param: value})
        trial = BenchSettings(**{**asdict(settings), param: value, "steps": 1, "warmup": 1, "repeats": 1,
                                 "quality_steps": 0, "find_max": None, "output": None})
        result = _run_case(trial, spec)
        peak = result["memory"]["peak_bytes"] if result["status"] == "ok" else None
        status = result["status"]
        if status == "ok" and limit is not None and peak > limit:
            status = "over limit"
        tries.append({"value": value, "status": status, "peak_bytes": peak,
                      "message": None if status in ("ok", "over limit") else result.get("message")})
        results[value] = result
        return status == "ok"

    from .plan import largest_that_fits

    # Sequence lengths are searched in multiples of 8: what kernels like, and fewer tries.
    step = 1 if param == "batch_size" else 8
    largest = largest_that_fits(lambda k: works(k * step), upper // step)
    largest = None if largest is None else largest * step
    search = {"strategy": spec, "parameter": param, "limit_bytes": limit, "largest": largest, "tries": tries,
              "predicted_largest": _predicted_largest(settings, spec, limit)}
    if largest is None:
        first = tries[0]
        return ({"strategy": spec, "status": "failed" if first["status"] == "over limit" else first["status"],
                 "message": first["message"] or f"even {param} = {first['value']} needs more than the memory limit"},
                search)
    search["peak_bytes"] = results[largest]["memory"]["peak_bytes"]
    return results[largest], search


def _predicted_largest(settings: BenchSettings, spec: str, limit: int | None) -> int | None:
    """What `adapters plan` predicts for the same search, or None without a limit or an estimate."""
    import torch

    from .plan import PlanSettings, make_plans

    if limit is None and torch.cuda.is_available():
        limit = torch.cuda.get_device_properties(0).total_memory
    if limit is None:
        return None
    (plan,) = make_plans(PlanSettings(
        model=settings.model, strategies=[spec], batch_size=settings.batch_size, seq_len=settings.seq_len,
        task=settings.task, gradient_checkpointing=settings.gradient_checkpointing, device=_device(),
        budget=str(limit)))["plans"]
    return plan["max_batch_size"] if settings.find_max == "batch_size" else plan["max_seq_len"]


def summary_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the summary table of a report."""
    rows = []
    for r in report["results"]:
        if r["status"] != "ok":
            rows.append([r["strategy"], r["status"], "", "", "", "", "", "", r.get("message") or ""])
            continue
        mem = r["memory"]
        comp = mem["components"]
        rows.append([
            r["strategy"], "ok", f"{r['trainable_parameters']:,}",
            f"{r['step_s']['median'] * 1000:,.0f} ±{100 * r['step_s']['spread'] / 2:.0f}%",
            f"{r['tokens_per_s']:,.0f}", f"{mem['peak_bytes'] / 2**20:,.0f}", _predicted(r.get("prediction")),
            f"{(comp['base_weights_quantized'] + comp['base_weights_unquantized']) / 2**20:,.0f} / "
            f"{(comp['trainable_parameters'] + comp['gradients'] + comp['optimizer_state']) / 2**20:,.0f} / "
            f"{comp['activations_and_temporaries'] / 2**20:,.0f}",
            "; ".join(r.get("flags") or []),
        ])
    headers = ["strategy", "status", "trainable", "step ms", "tokens/s", "peak MiB", "plan MiB (error)",
               "base / train+grad+opt / act MiB", "notes"]
    return headers, rows


def _predicted(prediction: dict[str, Any] | None) -> str:
    if not prediction:
        return "-"
    if prediction["status"] != "ok":
        return prediction["status"]
    return f"{prediction['peak_bytes'] / 2**20:,.0f} ({prediction['error_pct']['total']:+.1f}%)"


def capacity_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a capacity search's table."""
    rows = []
    for c in report.get("capacity", []):
        tried = ", ".join(f"{t['value']}{'' if t['status'] == 'ok' else ' ' + t['status']}" for t in c["tries"])
        rows.append([c["strategy"], "none" if c["largest"] is None else f"{c['largest']:,}",
                     f"{c['peak_bytes'] / 2**20:,.0f}" if c.get("peak_bytes") else "-",
                     "-" if c["predicted_largest"] is None else f"{c['predicted_largest']:,}", tried])
    param = report["settings"].get("find_max") or "value"
    return ["strategy", f"largest {param}", "its peak MiB", "plan predicts", "tries"], rows


def format_table(report: dict[str, Any]) -> str:
    """The report's results as an aligned plain-text table."""
    headers, rows = summary_rows(report)
    text = aligned_table(rows, headers)
    if report.get("capacity"):
        headers, rows = capacity_rows(report)
        text += "\n\n" + aligned_table(rows, headers)
    return text


def print_summary(report: dict[str, Any]) -> None:
    """The summary table, drawn with rich when it is installed."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_table(report))
        return
    headers, rows = summary_rows(report)
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: do not squeeze the table into 80 columns
        console = Console(width=200)
    table = Table(title=f"{report['settings']['model']} on {report['settings']['device']}")
    for i, header in enumerate(headers):
        table.add_column(header, justify="right" if 2 <= i <= 6 else "left", no_wrap=i < 8)
    for row in rows:
        ok = row[1] == "ok"
        table.add_row(*(row if ok else row[:-1] + [""]), style=None if ok else "yellow")
    console.print(table)
    for row in rows:
        if row[1] != "ok":
            console.print(f"[yellow]{row[0]}: {row[1]}[/]: {row[-1]}", highlight=False)
    if report.get("capacity"):
        headers, rows = capacity_rows(report)
        from .plan import format_bytes

        limit = report["capacity"][0]["limit_bytes"]
        table = Table(title=f"capacity search{'' if limit is None else f' under {format_bytes(limit)}'}")
        for header in headers:
            table.add_column(header)
        for row in rows:
            table.add_row(*row)
        console.print(table)


def _worker(case_path: str, out_path: str) -> int:
    case = json.loads(Path(case_path).read_text())
    settings = BenchSettings(**case["settings"])
    try:
        result = measure(settings, case["strategy"])
    except TrainingFailed as exc:
        result = {"strategy": case["strategy"], "status": "failed", "message": str(exc)}
    except AdaptersError as exc:
        result = {"strategy": case["strategy"], "status": "refused", "message": str(exc)}
    except Exception as exc:  # OOM and the like: recorded so the other strategies go on
        oom = "out of memory" in str(exc).lower()
        result = {"strategy": case["strategy"], "status": "oom" if oom else "failed",
                  "message": f"{type(exc).__name__}: {exc}"[:500]}
    write_json(Path(out_path), result)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:3]))
