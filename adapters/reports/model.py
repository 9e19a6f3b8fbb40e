"""The benchmark report, typed: what `adapters bench` writes, as msgspec structs.

The model is the format's one definition. `adapters.reports.load_report` decodes files through it,
and the shipped JSON Schema (``schemas/report-v1.schema.json``) is generated from it::

    python -m adapters.reports.model > adapters/schemas/report-v1.schema.json

Values that were not measured are ``None`` (JSON null). Fields a struct does not name are ignored on
loading, so files with later minor additions still load. A result is an `OkResult` (every
measurement present) or, for a strategy that did not run to the end, a `NotRun` subclass that
carries only the ``strategy`` and a ``message``; ``status`` tells them apart.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

SCHEMA_VERSION = 1  # bump together with Report.schema_version, and add an upgrade in load.py
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
SCHEMA_ID = "https://adapters.invalid/schemas/report-v{version}.schema.json"

Count = Annotated[int, Meta(ge=1)]
NonNegative = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(gt=0)]
Bytes = int  # a remainder (activations) can come out slightly negative from measurement noise


class Cpu(Struct, kw_only=True):
    """The CPU the report ran on."""

    model: str
    cores: int | None  # os.cpu_count() may not know


class Gpu(Struct, kw_only=True):
    """The GPUs the report ran on (the first one's name and memory)."""

    name: str
    count: Count
    memory_bytes: int


class Provenance(Struct, kw_only=True):
    """Where a report came from: code, command, software, machine."""

    commit: str | None
    dirty: bool | None  # uncommitted changes in the checkout; None outside git
    command: list[str]
    seed: int
    versions: dict[str, str | None]
    plugins: dict[str, str]
    python: str
    os: str
    cpu: Cpu
    gpu: Gpu | None


class Settings(Struct, kw_only=True):
    """What was run: `adapters bench`'s settings (the run each case measures, as `adapters.RunSpec` names its
    settings, and the suite's own) plus what the machine decided (dtype, device). Settings added after the first
    reports are optional: None (or empty) where a report does not say."""

    model: str
    strategies: list[str]
    task: str | None = None
    batch_size: Count
    seq_len: Count
    steps: Count  # timed steps per repeat
    warmup: NonNegative
    repeats: Count
    gradient_checkpointing: bool
    seed: int
    quality_steps: NonNegative = 0
    find_max: Literal["batch_size", "seq_len"] | None = None
    memory_limit: str | None = None
    output: str | None = None
    gradient_accumulation_steps: Count
    effective_batch_size: Count
    dtype: Literal["float32", "bfloat16", "float16"]
    device: Literal["cpu", "cuda"]
    processes: Count = 1  # each case one torchrun of this many, batch_size rows each
    sharding: Literal["none", "fsdp"] = "none"
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"
    quantization: str | None = None  # for every strategy that does not say NAME@QUANT
    data: str | None = None  # what the steps trained on (None: the built-in data for the task)
    packing: bool | None = None
    train_on_prompt: bool | None = None
    learning_rate: float | None = None
    lr_scheduler: str | None = None
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    loss_chunk: int | None = None
    compile: bool | None = None
    offload_activations: bool | None = None
    optimizer_in_backward: bool | None = None
    master_weights: Literal["fp32", "none"] | None = None
    mixed_precision: Literal["bf16", "no"] | None = None  # None: the device's default (bf16 on CUDA, no on the CPU)
    checkpoint_layers: int | None = None  # with gradient_checkpointing: the first this many layers; None: all
    options: dict[str, Any] = {}  # strategy options, for every strategy of the suite
    run: str | None = None  # `adapters bench --run RUN`: the run whose settings these are


class StepTimes(Struct, kw_only=True):
    """Seconds per training step over every timed step; ``spread`` is (max - min) / median."""

    median: Seconds
    min: Seconds
    max: Seconds
    spread: Annotated[float, Meta(ge=0)]
    repeat_medians: Annotated[list[float], Meta(min_length=1)]


class MemoryComponents(Struct, kw_only=True):
    """What holds the peak, in bytes; activations and temporaries are the measured rest."""

    base_weights_quantized: Bytes
    base_weights_unquantized: Bytes
    trainable_parameters: Bytes
    gradients: Bytes
    optimizer_state: Bytes
    activations_and_temporaries: Bytes


class Memory(Struct, kw_only=True):
    """Peak memory of a training step and where it was measured."""

    peak_bytes: NonNegative
    source: Literal["cuda_max_memory_allocated", "cpu_profiler_allocation_events"]
    components: MemoryComponents
    peak_rss_bytes: int
    reserved_bytes: int | None
    nvml_used_bytes: int | None
    # With several processes: each one's peak, in rank order (peak_bytes and components are the largest one's).
    per_process_peak_bytes: list[NonNegative] | None = None


class Scaling(Struct, kw_only=True):
    """A run of several processes against one process, measured in the same bench."""

    single_process_tokens_per_s: Annotated[float, Meta(gt=0)]
    single_process_peak_bytes: NonNegative
    efficiency: Annotated[float, Meta(gt=0)]  # tokens/s with N processes / (N x tokens/s with 1)


class Quality(Struct, kw_only=True):
    """Held-out quality before and after a few training steps on real data (``status`` failed: no numbers)."""

    steps: Count
    status: Literal["ok", "failed"]
    before: dict[str, float | None] | None = None  # e.g. loss, perplexity, accuracy; null: not finite
    after: dict[str, float | None] | None = None
    losses: list[float | None] | None = None
    message: str | None = None
    # What the quality run ended with, when it backed off after running out of memory (else as the settings say).
    batch_size: Count | None = None
    gradient_accumulation_steps: Count | None = None


class Prediction(Struct, kw_only=True):
    """`adapters plan`'s prediction for the measured run; the numbers are present when ``status`` is ok."""

    status: str  # "ok", or why there is no estimate
    message: str | None
    peak_bytes: NonNegative | None = None
    phase: str | None = None
    components: dict[str, int] | None = None
    error_pct: dict[str, float | None] | None = None  # (predicted - measured) / measured, per component and total


class Engine(Struct, kw_only=True):
    """How the measured steps computed (`adapters.rules`): as the rules chose, and what the run found out."""

    device: str
    compiled: bool
    recomputes_mlp: bool
    optimizer: str
    loss_path: str
    ignore_index: int


class _Result(Struct, kw_only=True, tag_field="status"):
    strategy: str  # the spec benchmarked, e.g. "lora@nf4"
    message: str | None = None

    @property
    def status(self) -> str:
        return type(self).__struct_config__.tag

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class OkResult(_Result, tag="ok", kw_only=True):
    """A strategy that trained: its timings, memory, parameters and quality."""

    name: str
    quantization: Literal["none", "nf4", "fp4", "int8"]
    task: Literal["causal-lm", "sequence-classification"]
    load_s: Annotated[float, Meta(ge=0)]  # loading the base and applying the strategy in a fresh process
    # Every load's seconds, load_s first, then loads again in the same process: the load time's own
    # spread, which compare judges it by. Absent in older reports (compare is then conservative).
    load_s_repeats: Annotated[list[Annotated[float, Meta(ge=0)]], Meta(min_length=1)] | None = None
    step_s: StepTimes
    steps_run: int | None = None
    tokens_per_step: Count
    tokens_per_s: Annotated[float, Meta(gt=0)]
    # The micro-batch and accumulation the row really ran with, when it says: a run that backed off
    # (e.g. halved its micro-batch after running out of memory) differs from the settings, and
    # compare flags the mismatch. Absent: as the settings say.
    batch_size: Count | None = None
    gradient_accumulation_steps: Count | None = None
    trainable_parameters: Count
    declared_trainable_parameters: int | None = None
    total_parameters: Count
    final_loss: float | None = None
    memory: Memory
    mfu: float | None
    energy_j_per_token: float | None
    quality: Quality | None
    flags: list[str]
    prediction: Prediction | None = None
    compiled_layers: int | None = None  # decoder layers under torch.compile (--compile); None in older reports
    compile_s: Annotated[float, Meta(ge=0)] | None = None  # the first compiled step's extra seconds, apart from step_s
    # --memory-limit: the micro-batch, accumulation and checkpointing the plan chose to fit, why, and each candidate.
    memory_fit: dict[str, Any] | None = None
    loss_path: str | None = None  # how the loss was computed: "chunked(N)", "liger" or "model"; None in older reports
    # The processes of the run (tokens_per_step and tokens_per_s are all of theirs); None: one, as in older reports.
    processes: Count | None = None
    scaling: Scaling | None = None  # with several processes: against one, measured in the same bench
    engine: Engine | None = None  # how the steps computed; None in older reports


class NotRun(_Result):
    """A strategy that did not run to the end; ``message`` says why."""


class Refused(NotRun, tag="refused"):
    """The strategy refused the settings (e.g. full fine-tuning of a quantized base)."""


class Failed(NotRun, tag="failed"):
    """The run raised an error or stopped on a non-finite loss."""


class OutOfMemory(NotRun, tag="oom"):
    """The run ran out of memory."""


class Cancelled(NotRun, tag="cancelled"):
    """The user interrupted the benchmark before this strategy ran."""


Result = OkResult | Refused | Failed | OutOfMemory | Cancelled


class CapacityTry(Struct, kw_only=True):
    """One real run of a capacity search."""

    value: Count
    status: str  # a result status, or "over limit"
    peak_bytes: int | None
    message: str | None = None


class Capacity(Struct, kw_only=True):
    """The largest batch size or sequence length that trained under the limit, and the plan's prediction of it."""

    strategy: str
    parameter: Literal["batch_size", "seq_len"]
    limit_bytes: int | None
    largest: int | None
    peak_bytes: int | None = None  # at the largest value that worked
    predicted_largest: int | None
    tries: list[CapacityTry]


class Report(Struct, kw_only=True):
    """An adapters benchmark report, as `adapters bench` writes it."""

    schema_version: Literal[1]
    created: str  # ISO 8601, UTC
    provenance: Provenance
    settings: Settings
    results: list[Result]
    capacity: list[Capacity] = []
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM: what was measured, the rest cancelled

    def ok_results(self) -> list[OkResult]:
        return [r for r in self.results if isinstance(r, OkResult)]


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the current report version, generated from the model."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID.format(version=SCHEMA_VERSION),
        "title": f"adapters benchmark report, schema_version {SCHEMA_VERSION}",
        **msgspec.json.schema(Report),
    }


def schema_text() -> str:
    """`json_schema` as the shipped file holds it."""
    return json.dumps(json_schema(), indent=2, allow_nan=False) + "\n"


def schema_path(version: int = SCHEMA_VERSION) -> Path:
    return SCHEMA_DIR / f"report-v{version}.schema.json"


def schema(version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """The shipped JSON Schema of a report version."""
    return json.loads(schema_path(version).read_text())


def write_schema() -> Path:
    """Regenerate the shipped schema file of the current version from the model."""
    from ..files import write_atomic

    return write_atomic(schema_path(), schema_text())


if __name__ == "__main__":
    print(schema_text(), end="")
