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
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdaptersError, TrainingFailed
from .options import convert_value, read_toml
from .store import package_versions, write_json

SCHEMA_VERSION = 1


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
    output: str | None = None


def settings_from(suite: str | None, given: dict[str, Any]) -> BenchSettings:
    """Settings from a suite file, overridden by ``given`` (the flags a user typed)."""
    hints = typing.get_type_hints(BenchSettings)
    values: dict[str, Any] = {}
    if suite:
        for key, value in read_toml(suite).items():
            name = key.replace("-", "_")
            if name not in hints:
                raise AdaptersError(f"--suite {suite}: unknown key {key!r}. Known keys: {', '.join(hints)}.")
            values[name] = convert_value(value, hints[name], key)
    values.update(given)
    settings = BenchSettings(**values)
    for name in ("batch_size", "seq_len", "steps", "repeats"):
        if getattr(settings, name) < 1:
            raise AdaptersError(f"--{name.replace('_', '-')} must be at least 1.")
    if settings.warmup < 0:
        raise AdaptersError("--warmup must be 0 or more.")
    return settings


def _train_settings(settings: BenchSettings, strategy: str):
    from .train import TrainSettings

    return TrainSettings(model=settings.model, strategy=strategy, task=settings.task,
                         batch_size=settings.batch_size, seq_len=settings.seq_len,
                         gradient_checkpointing=settings.gradient_checkpointing, seed=settings.seed)


def measure(settings: BenchSettings, strategy: str) -> dict[str, Any]:
    """Load, apply and time one strategy in this process (the worker's job)."""
    import torch

    from .strategy import count_parameters
    from .train import build, make_accelerator, make_batches, resolve, training_step

    run = resolve(_train_settings(settings, strategy))
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    accelerator = make_accelerator()
    start = time.perf_counter()
    base, model = build(run, accelerator.device)
    load_s = time.perf_counter() - start
    params = count_parameters(model)
    data = make_batches(run.dataset.train, base, settings.seq_len, "train")
    batch = {k: v[: settings.batch_size] for k, v in data.tensors.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(settings.warmup):
        training_step(model, batch, optimizer, accelerator, i + 1)
    times: list[list[float]] = []
    losses = []
    for _ in range(settings.repeats):
        repeat = []
        for i in range(settings.steps):
            sync()
            t = time.perf_counter()
            losses.append(training_step(model, batch, optimizer, accelerator, i + 1).item())
            sync()
            repeat.append(time.perf_counter() - t)
        times.append(repeat)
    flat = sorted(t for r in times for t in r)
    median = statistics.median(flat)
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    result: dict[str, Any] = {
        "strategy": run.strategy.name,
        "quantization": run.quantization,
        "task": run.task,
        "status": "ok",
        "load_s": load_s,
        "step_s": {"median": median, "min": flat[0], "max": flat[-1],
                   "repeat_medians": [statistics.median(r) for r in times]},
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / median,
        "trainable_parameters": params.trainable,
        "total_parameters": params.total,
        "final_loss": losses[-1],
        "peak_rss_bytes": _peak_rss(),
    }
    if cuda:
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["max_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return result


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
    from .plugins import distribution_of, get_registry

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
    from .plugins import get_registry
    from .train import split_strategy

    registry = get_registry()
    if not settings.strategies:
        raise AdaptersError("--strategies is empty. Name at least one, e.g. --strategies lora,full-finetune.")
    for spec in settings.strategies:
        registry.entry(split_strategy(spec, None)[0])


def run_bench(settings: BenchSettings, progress: bool = True) -> dict[str, Any]:
    """Benchmark every strategy in ``settings`` and return the report (also written to ``output``)."""
    import torch
    from tqdm.auto import tqdm

    from .models import resolve_model
    from .train import resolve

    _check_strategies(settings)
    resolve_model(settings.model)
    output = Path(settings.output) if settings.output else None
    if output is not None and output.exists():
        raise AdaptersError(f"--output {output}: exists. Choose a new file name; reports are never overwritten.")
    results = []
    bar = tqdm(settings.strategies, desc="bench", unit="strategy", disable=not progress)
    for spec in bar:
        bar.set_postfix(strategy=spec)
        try:
            resolve(_train_settings(settings, spec))
        except AdaptersError as exc:  # e.g. full-finetune on a quantized base: recorded, not fatal
            results.append({"strategy": spec, "status": "refused", "message": str(exc)})
            continue
        results.append(_run_case(settings, spec))
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance(),
        "settings": {**asdict(settings), "dtype": "bfloat16" if torch.cuda.is_available() else "float32",
                     "effective_batch_size": settings.batch_size},
        "results": results,
    }
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_json(output, report)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report's results as an aligned text table."""
    rows = []
    gpu = any("max_memory_allocated_bytes" in r for r in report["results"])
    for r in report["results"]:
        name = r["strategy"] if "@" in r["strategy"] or r.get("quantization") in (None, "none") \
            else f"{r['strategy']}@{r['quantization']}"
        if r["status"] != "ok":
            rows.append([name, r["status"], "", "", "", "", r.get("message", "")[:80]])
            continue
        memory = r["max_memory_allocated_bytes"] if gpu else r["peak_rss_bytes"]
        rows.append([
            name, "ok", f"{r['trainable_parameters']:,}",
            f"{r['step_s']['median'] * 1000:,.0f}", f"{r['tokens_per_s']:,.0f}", f"{memory / 2**20:,.0f}",
            f"load {r['load_s']:.1f} s",
        ])
    headers = ["strategy", "status", "trainable", "step ms", "tokens/s",
               "peak MiB" + (" (CUDA)" if gpu else " (RSS)"), "notes"]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


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
