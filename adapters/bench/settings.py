"""What a benchmark suite asks for, and how it splits into one case per strategy.

`BenchSettings` is the suite: a `RunSpec` (the run every case measures, as `adapters train` would run it) with
the strategies to measure and how. Suite files use flat keys: the spec's (`adapters.runspec.fields_for("bench")`,
strategy options in an ``[options]`` table) and the suite's own. Each strategy becomes a case: the spec with that
strategy, and a `Measurement`, how the run is timed and measured. The worker process gets both as JSON.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdaptersError
from ..options import read_toml
from ..runspec import RunSpec, check_at_least, check_sharding, fields_for, file_values, memory_limit, with_spec

FIND_MAX = ("batch_size", "seq_len")
DEFAULT_STRATEGIES = ("lora", "lora@nf4", "prefix-tuning", "linear-probe", "full-finetune")


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
    """What `adapters bench` runs (see the module's docstring)."""

    spec: RunSpec = field(default_factory=RunSpec)  # the run each case measures; its strategy is the case's
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    steps: int = Measurement.steps
    warmup: int = Measurement.warmup
    repeats: int = Measurement.repeats
    quality_steps: int = Measurement.quality_steps
    # "batch_size" or "seq_len": search for the largest that runs; with the spec's memory_limit, a try whose peak
    # exceeds it fails (required on the CPU). Without a search, each case is fitted into the memory limit as
    # `adapters train --memory-limit` fits a run (`adapters.plan.fit`).
    find_max: str | None = None
    output: str | None = None
    run: str | None = None  # `adapters bench --run RUN`: the run whose settings these are
    # Each case as one run of this many processes (torchrun), the spec's batch_size rows each; above 1, each strategy
    # is also measured in one process, for the scaling efficiency.
    processes: int = 1

    @classmethod
    def of(cls, **values: Any) -> BenchSettings:
        """Settings from flat values: `RunSpec` fields (``model``, ``batch_size``, ``options``, ...) and the suite's
        own (``strategies``, ``steps``, ...)."""
        return with_spec(cls, values, "bench")

    def case(self, strategy: str) -> RunSpec:
        """The run measured for ``strategy`` (``NAME`` or ``NAME@QUANT``).

        With a memory limit and no capacity search, the run as fitted into the limit: its micro-batch,
        accumulation and checkpointing chosen by the plan (`adapters.plan.fit`), the limit kept in it so that the
        worker's `resolve` fits it again (the same choice) and has the fit's record. A strategy that does not fit
        raises `adapters.plan.fit.MemoryLimitTooSmall`, a `StrategyRefused`: a refused row.
        """
        spec = dataclasses.replace(self.spec, strategy=strategy, options=dict(self.spec.options))
        if self.find_max:
            return dataclasses.replace(spec, memory_limit=None)  # the search's limit, not a fit
        if spec.memory_limit is None:
            return spec
        from ..resolver import resolve

        return resolve(spec, data=False).spec

    def measurement(self) -> Measurement:
        """How each case of the suite is measured."""
        # Each repeat also loads the model again (after the first, for the steps), so that load time has
        # a spread of its own, as step time does; one repeat, one load (loading can take long: nf4 on a CPU).
        return Measurement(self.steps, self.warmup, self.repeats, self.quality_steps, self.spec.memory_limit,
                           loads=self.repeats)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a report records them: flat, the spec's fields beside the suite's own."""
        spec = {f.name: getattr(self.spec, f.name) for f in fields_for("bench")}
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "spec"}
        return {**spec, **own}


# What `adapters bench --run` takes from the run, so that flags may not give it too.
FROM_RUN = ("model", "strategies", "task")


def settings_for_run(run: str, given: dict[str, Any]) -> BenchSettings:
    """``adapters bench --run RUN``: what RUN trains, as it recorded it: its strategy with its options, its base
    model, quantization, task and data, and every other setting of the run that bench takes (the batch, packing,
    the loss, compile, ...), unless ``given`` says otherwise. Memory and speed do not depend on the values of the
    weights, so the strategy is applied afresh, as for any benchmark; the saved weights are not loaded.
    """
    from ..resuming import saved_spec

    if (Path(run) / "config.json").is_file():
        raise AdaptersError(f"--run {run}: a transformers checkpoint (config.json), not a run. Benchmark it as a "
                            f"base with --model {run}.")
    clash = [k for k in FROM_RUN if k in given]
    if clash:
        raise AdaptersError(f"--run takes the model, strategy and task from {run}; drop --{clash[0]}.")
    recorded = saved_spec(run)
    values = {k: recorded[k] for k in (f.name for f in fields_for("bench")) if k in recorded}
    values.update(strategies=[f"{recorded['strategy']}@{recorded['quantization']}"], quantization=None, run=str(run))
    return settings_from(None, {**values, **given})


def settings_from(suite: str | None, given: dict[str, Any]) -> BenchSettings:
    """Settings from a suite file, overridden by ``given`` (flat: what a user typed), checked."""
    values = file_values(read_toml(suite), BenchSettings, "bench", f"--suite {suite}") if suite else {}
    options = {**values.get("options", {}), **given.get("options", {})}
    settings = BenchSettings.of(**{**values, **given, "options": options})
    check_at_least(1, batch_size=settings.spec.batch_size, seq_len=settings.spec.seq_len, steps=settings.steps,
                   repeats=settings.repeats)
    check_at_least(0, warmup=settings.warmup, quality_steps=settings.quality_steps)
    if settings.find_max not in (None, *FIND_MAX):
        raise AdaptersError(f"find_max = {settings.find_max!r}: use batch_size or seq_len.")
    memory_limit(settings.spec.memory_limit)
    check_processes(settings)
    return settings


def check_processes(settings: BenchSettings) -> None:
    """--processes and --sharding: what a run of several processes can measure here."""
    s = settings.spec
    check_at_least(1, processes=settings.processes)
    check_sharding(s.sharding, "none", None)  # the name; with a quantized base, resolve refuses each case
    if settings.processes == 1 and s.sharding == "none":
        return
    launched = f"--processes {settings.processes}" if settings.processes > 1 else f"--sharding {s.sharding}"
    unsupported = {"--quality-steps": settings.quality_steps, "--find-max-batch/--find-max-seq-len": settings.find_max,
                   "--memory-limit": s.memory_limit}
    given = [flag for flag, value in unsupported.items() if value]
    if given:
        raise AdaptersError(f"{given[0]} with {launched}: measured in one plain process only so far. "
                            f"Drop {given[0].split('/')[0]}, or {launched.split()[0]}.")
