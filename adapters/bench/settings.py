"""What a benchmark suite asks for, and how it splits into one case per strategy.

`BenchSettings` is the suite (its fields are the suite file's keys and the report's ``settings``).
Each strategy in it becomes a case: a `RunSpec`, the run that `adapters train` would make, and a
`Measurement`, how that run is timed and measured. The worker process gets both as JSON.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import AdaptersError
from ..options import read_toml, settings_values
from ..runspec import DEFAULT_MODEL, RunSpec, check_at_least, memory_limit

FIND_MAX = ("batch_size", "seq_len")


@dataclass
class Measurement:
    """How one case is measured, beside the run it trains."""

    steps: int = 3  # timed steps per repeat
    warmup: int = 1  # untimed steps before the first repeat
    repeats: int = 1
    quality_steps: int = 0  # >0: held-out quality before and after this many steps on real data
    memory_limit: str | None = None  # on a GPU, allocations past it fail with a real out-of-memory error
    loads: int = 1  # loads of the model, the first one for the timed steps: two or more give load time a spread

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BenchSettings:
    """What `adapters bench` runs; suite files (TOML) use the same keys."""

    model: str = DEFAULT_MODEL
    strategies: list[str] = field(
        default_factory=lambda: ["lora", "lora@nf4", "prefix-tuning", "linear-probe", "full-finetune"]
    )
    task: str | None = None
    batch_size: int = 2
    seq_len: int = 128
    steps: int = Measurement.steps
    warmup: int = Measurement.warmup
    repeats: int = Measurement.repeats
    gradient_checkpointing: bool = False
    loss_chunk: int | None = None  # as RunSpec.loss_chunk
    compile: bool | None = None  # as RunSpec.compile
    seed: int = 0
    quality_steps: int = Measurement.quality_steps
    find_max: str | None = None  # "batch_size" or "seq_len": search for the largest that runs
    # e.g. "4GiB". With find_max, a try whose peak exceeds it fails (required on the CPU for a search); without,
    # each case is fitted into it as `adapters train --memory-limit` fits a run (`adapters.plan.fit`).
    memory_limit: str | None = None
    output: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # strategy options, for every strategy of the suite
    data: str | None = None  # the data the steps train on (None: the built-in data for the task)
    run: str | None = None  # `adapters bench --run RUN`: the run whose settings these are
    # Each case as one run of this many processes (torchrun), `batch_size` rows each; above 1, each strategy is also
    # measured in one process, for the scaling efficiency.
    processes: int = 1
    sharding: str = "none"  # as RunSpec.sharding: "fsdp" shards weights, gradients and optimizer states

    def spec(self, strategy: str) -> RunSpec:
        """The run measured for ``strategy`` (``NAME`` or ``NAME@QUANT``).

        With a memory limit and no capacity search, the run as fitted into the limit: its micro-batch,
        accumulation and checkpointing chosen by the plan (`adapters.plan.fit`), the limit kept in it so that the
        worker's `resolve` fits it again (the same choice) and has the fit's record. A strategy that does not fit
        raises `adapters.plan.fit.MemoryLimitTooSmall`, a `StrategyRefused`: a refused row.
        """
        spec = RunSpec(model=self.model, strategy=strategy, task=self.task, batch_size=self.batch_size,
                       seq_len=self.seq_len, gradient_checkpointing=self.gradient_checkpointing, seed=self.seed,
                       loss_chunk=self.loss_chunk, compile=self.compile, data=self.data, options=dict(self.options),
                       sharding=self.sharding)
        if self.memory_limit is None or self.find_max:
            return spec
        from ..runspec import resolve

        return resolve(dataclasses.replace(spec, memory_limit=self.memory_limit), data=False).spec

    def measurement(self) -> Measurement:
        """How each case of the suite is measured."""
        # Each repeat also loads the model again (after the first, for the steps), so that load time has
        # a spread of its own, as step time does; one repeat, one load (loading can take long: nf4 on a CPU).
        return Measurement(self.steps, self.warmup, self.repeats, self.quality_steps, self.memory_limit,
                           loads=self.repeats)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# What `adapters bench --run` takes from the run, so that flags may not give it too.
FROM_RUN = ("model", "strategies", "task")
# What it takes from the run unless flags say otherwise.
RECORDED = ("batch_size", "seq_len", "gradient_checkpointing", "loss_chunk", "compile", "seed")


def settings_for_run(run: str, given: dict[str, Any]) -> BenchSettings:
    """``adapters bench --run RUN``: the run's strategy, with its recorded options, base model,
    quantization, task and data, at its recorded batch size, sequence length, gradient checkpointing
    and seed unless ``given`` says otherwise. Memory and speed do not depend on the values of the
    weights, so the strategy is applied afresh, as for any benchmark; the saved weights are not loaded.
    """
    from pathlib import Path

    from ..checkpoints import saved_spec

    if (Path(run) / "config.json").is_file():
        raise AdaptersError(f"--run {run}: a transformers checkpoint (config.json), not a run. Benchmark it as a "
                            f"base with --model {run}.")
    clash = [k for k in FROM_RUN if k in given]
    if clash:
        raise AdaptersError(f"--run takes the model, strategy and task from {run}; drop --{clash[0]}.")
    recorded = saved_spec(run)
    values = {"model": recorded["model"], "strategies": [f"{recorded['strategy']}@{recorded['quantization']}"],
              "task": recorded["task"], "options": recorded["options"], "data": recorded.get("data"), "run": str(run),
              **{k: recorded[k] for k in RECORDED if k in recorded}}
    return settings_from(None, {**values, **given})


def settings_from(suite: str | None, given: dict[str, Any]) -> BenchSettings:
    """Settings from a suite file, overridden by ``given`` (the flags a user typed), checked."""
    values = settings_values(read_toml(suite), BenchSettings, f"--suite {suite}") if suite else {}
    values.update(given)
    settings = BenchSettings(**values)
    check_at_least(1, batch_size=settings.batch_size, seq_len=settings.seq_len, steps=settings.steps,
                   repeats=settings.repeats)
    check_at_least(0, warmup=settings.warmup, quality_steps=settings.quality_steps)
    if settings.find_max not in (None, *FIND_MAX):
        raise AdaptersError(f"find_max = {settings.find_max!r}: use batch_size or seq_len.")
    if settings.memory_limit is not None:
        memory_limit(settings.memory_limit)
    check_processes(settings)
    return settings


def check_processes(settings: BenchSettings) -> None:
    """--processes and --sharding: what a run of several processes can measure here."""
    from ..runspec import check_sharding

    check_at_least(1, processes=settings.processes)
    check_sharding(settings.sharding, "none", None)  # the name; with a quantized base, resolve refuses each case
    if settings.processes == 1 and settings.sharding == "none":
        return
    launched = f"--processes {settings.processes}" if settings.processes > 1 else f"--sharding {settings.sharding}"
    unsupported = {"--quality-steps": settings.quality_steps, "--find-max-batch/--find-max-seq-len": settings.find_max,
                   "--memory-limit": settings.memory_limit}
    given = [flag for flag, value in unsupported.items() if value]
    if given:
        raise AdaptersError(f"{given[0]} with {launched}: measured in one plain process only so far. "
                            f"Drop {given[0].split('/')[0]}, or {launched.split()[0]}.")
