"""What a run is: `RunSpec`, declared once, and `Run`, a spec resolved. No torch, no resolver.

`RunSpec` is the model, the strategy and its options, the data, the batch and how the run goes. Each field is
declared with `setting`: its default, its help text and which commands take it (`COMMANDS`). The command line of
``adapters train``, ``bench`` and ``plan`` is generated from these declarations (`adapters.cli.settings`), and so
are config files' keys, so a setting has one name, one type and one default everywhere. train runs one spec; bench
measures one per strategy; plan predicts one per strategy; the kit checks one per cell. `adapters.resolver.resolve`
checks a spec against the registry, the model and the data, and gives the `Run`.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .contract import LR_SCHEDULERS, QUANTIZATIONS, TASKS, RunShape, Strategy
from .errors import AdaptersError
from .options import read_toml, settings_values
from .rules import DEFAULT_MASTER_WEIGHTS, DEFAULT_OPTIMIZER, MASTER_WEIGHTS, MIXED_PRECISION, OPTIMIZERS

if TYPE_CHECKING:
    from .data import Dataset
    from .models import ModelSpec

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_STRATEGY = "lora"
SHARDINGS = ("none", "fsdp")

# The commands whose options a setting is: the workload (what is computed, so what memory and speed depend on) is
# every command's; how a run trains is train's and bench's (bench measures what train runs); where a run goes is
# train's alone.
WORKLOAD = ("train", "bench", "plan")
RUN = ("train", "bench")
TRAIN = ("train",)


def setting(default: Any = dataclasses.MISSING, *, help: str, commands: tuple[str, ...] = TRAIN,
            factory: Any = dataclasses.MISSING, metavar: str | None = None,
            choices: tuple[str, ...] | None = None, option: str | None = None) -> Any:
    """A `RunSpec` field with what its command-line option needs: ``help``, the ``commands`` that take it, and
    optionally a ``metavar``, the ``choices`` it accepts, or an ``option`` name other than the field's."""
    metadata = {"help": help, "commands": commands, "metavar": metavar, "choices": choices, "option": option}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunSpec:
    """Everything one run accepts; command-line options and config-file keys use these names."""

    model: str = setting(DEFAULT_MODEL, commands=WORKLOAD, help="A named model (see `adapters models`), "
                         "random:SHAPE, a local checkpoint directory, or a hub id when a hub is reachable.")
    strategy: str = setting(DEFAULT_STRATEGY, metavar="NAME[@QUANT]",
                            help="The strategy by name (see `adapters strategies`), or NAME@QUANT, e.g. lora@int8.")
    quantization: str | None = setting(None, commands=WORKLOAD, choices=QUANTIZATIONS,
                                       help="Quantize the base [default: the strategy's own: nf4 for qlora, else "
                                       "none].")
    task: str | None = setting(None, commands=WORKLOAD, choices=TASKS, help="[default: the model's own]")
    # From Python also a datasets.Dataset or an iterable of dicts, which the run records as "<KIND: N rows>".
    data: str | os.PathLike[str] | Iterable[dict[str, Any]] | None = setting(
        None, commands=RUN, metavar="FILE",
        help="Training data: a .txt, .jsonl, .json, .csv or .parquet file (plugins add other formats), a `datasets` "
        "save_to_disk directory, or builtin:NAME (python-reference, instructions, stdlib-docstrings); columns: "
        "messages, prompt/completion, instruction/input/output or text [default: built-in real text].")
    packing: bool | None = setting(None, commands=RUN, help="Instruction and chat data: pack several examples into "
                                   "each --seq-len row, attention kept within each [default: packing, which "
                                   "measured faster].")
    train_on_prompt: bool = setting(False, commands=RUN, help="Instruction and chat data: train on the prompt's "
                                    "tokens too, not the completion's alone.")
    max_steps: int = setting(20, help="Optimizer steps.")
    batch_size: int = setting(4, commands=WORKLOAD, help="Rows per device and micro-step.")
    gradient_accumulation_steps: int = setting(1, commands=RUN, help="Micro-steps per optimizer step.")
    seq_len: int = setting(128, commands=WORKLOAD, help="Tokens per row.")
    learning_rate: float | None = setting(None, commands=RUN, help="[default: the strategy's own]")
    lr_scheduler: str | None = setting(None, commands=RUN, choices=LR_SCHEDULERS,
                                       help="Learning-rate schedule [default: the strategy's own, cosine].")
    warmup_steps: int | None = setting(None, commands=RUN, help="Steps of linear warm-up (or --warmup-ratio).")
    warmup_ratio: float | None = setting(None, commands=RUN, help="Warm-up as a fraction of --max-steps [default: "
                                         "the strategy's own, 0].")
    weight_decay: float | None = setting(None, commands=RUN, help="AdamW's weight decay [default: the strategy's, "
                                         "0].")
    max_grad_norm: float | None = setting(None, commands=RUN, help="Clip gradients to this norm; 0 turns clipping "
                                          "off [default: the strategy's, 1.0].")
    # The optimizer's share (issue 22): keep these together.
    optimizer: str = setting(DEFAULT_OPTIMIZER, commands=WORKLOAD, choices=OPTIMIZERS,
                             help="adamw: torch's AdamW, float32 states; adamw8bit: bitsandbytes' 8-bit AdamW "
                             "(about a quarter of the states' memory); paged_adamw8bit: the same, its states paged "
                             "to host memory under pressure on CUDA.")
    optimizer_in_backward: bool = setting(False, commands=WORKLOAD,
                                          help="Step each weight during backward, as soon as its gradient is whole, "
                                          "and free that gradient: the whole model's gradients never exist at once. "
                                          "Exact; refused with gradient accumulation, clipping or several processes.")
    master_weights: str = setting(DEFAULT_MASTER_WEIGHTS, commands=WORKLOAD, choices=MASTER_WEIGHTS,
                                  help="fp32: keep float32 master copies of the weights that train; none: train in "
                                  "bf16 throughout (base, trained weights, gradients and AdamW's moments), half "
                                  "their memory, updates rounded at bf16's resolution.")
    mixed_precision: str | None = setting(None, commands=WORKLOAD, choices=MIXED_PRECISION,
                                          help="bf16: compute under bf16 autocast, the frozen base in bf16 and what "
                                          "trains kept as float32 masters; no: compute in the weights' dtype "
                                          "[default: bf16 on CUDA, no on the CPU].")
    gradient_checkpointing: bool = setting(False, commands=WORKLOAD,
                                           help="Recompute activations in backward to save memory.")
    checkpoint_layers: int | None = setting(None, commands=WORKLOAD, metavar="N",
                                            help="Checkpoint only the first N decoder layers, keeping the others' "
                                            "activations: part of checkpointing's saving for part of its cost "
                                            "(implies --gradient-checkpointing) [default: every layer].")
    offload_activations: bool = setting(False, commands=WORKLOAD,
                                        help="CUDA: move saved activations to host memory during the forward "
                                        "(overlapped on a side stream) and back for backward; refused elsewhere.")
    loss_chunk: int | None = setting(None, commands=WORKLOAD, metavar="TOKENS",
                                     help="Causal LM: compute the loss in chunks of this many tokens, never the whole "
                                     "batch's logits; 0: the model's own loss [default: a measured chunk size].")
    compile: bool | None = setting(None, commands=WORKLOAD, help="torch.compile each decoder layer [default: the "
                                   "device's measured default: on for CUDA, off for the CPU and under sharding].")
    memory_limit: str | None = setting(None, commands=RUN, metavar="SIZE",
                                       help="Fit the run into SIZE (e.g. 6GiB): the plan chooses the micro-batch, "
                                       "gradient checkpointing and accumulation, keeping the effective batch.")
    sharding: str = setting("none", commands=WORKLOAD, choices=SHARDINGS,
                            help="fsdp: shard weights, gradients and optimizer states across the processes (FSDP2 "
                            "through Accelerate, a unit per decoder layer); none: each process holds the whole model.")
    seed: int = setting(0, commands=RUN, help="Seeds the weights a strategy adds, dropout and the data's order.")
    eval_batches: int = setting(8, help="Held-out batches evaluated before and after training; 0: none.")
    eval_every: int | None = setting(None, help="Also evaluate the held-out split every N steps.")
    log_every: int = setting(10, help="Steps between lines of OUTPUT/metrics.jsonl.")
    save_every: int | None = setting(None, help="Write OUTPUT/checkpoints/step-N every N steps.")
    keep_checkpoints: int | None = setting(None, help="Keep only the newest K checkpoints.")
    report_to: list[str] = setting(factory=list, metavar="TRACKER",
                                   help="An Accelerate tracker: tensorboard, wandb, mlflow, ... (repeatable); logs go "
                                   "to OUTPUT/logs.")
    output: str | None = setting(None, help="Directory to save the trained strategy, its checkpoints and metrics in.")
    overwrite: bool = setting(False, help="Replace --output when it holds an earlier adapters run.")
    resume: bool = setting(False, metavar="OUTPUT",
                           help="Continue the run in OUTPUT: from its newest checkpoint, exactly, with the settings "
                           "recorded there; or, when it has none, from its final save with a fresh optimizer and "
                           "schedule for --max-steps more steps.")
    allow_other_base: bool = setting(False, help="With --resume: continue onto a base whose weights differ from the "
                                     "checkpoint's.")
    options: dict[str, Any] = setting(factory=dict, commands=WORKLOAD, metavar="KEY=VALUE", option="set",
                                      help="A strategy option (repeatable), checked against the strategy's options.")

    def __post_init__(self) -> None:
        if self.checkpoint_layers is not None:  # checkpointing some of the layers is checkpointing
            self.gradient_checkpointing = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TrainSettings = RunSpec  # the name before 0.2; `adapters.TrainSettings` keeps working


def run_shape(spec: RunSpec, task: str, quantization: str, device: str, **changes: Any) -> RunShape:
    """The run a memory estimate or a strategy's refusal is for (`adapters.RunShape`), as ``spec`` asks for it on
    ``device`` (a device type); ``changes`` override its fields (a fitted micro-batch, checkpointing, the
    processes)."""
    fields = dict(batch_size=spec.batch_size, seq_len=spec.seq_len, task=task, quantization=quantization,
                  gradient_checkpointing=spec.gradient_checkpointing, checkpoint_layers=spec.checkpoint_layers,
                  device=device, loss_chunk=spec.loss_chunk,
                  compile=spec.compile, sharding=spec.sharding, optimizer=spec.optimizer,
                  offload_activations=spec.offload_activations, optimizer_in_backward=spec.optimizer_in_backward,
                  master_weights=spec.master_weights, mixed_precision=spec.mixed_precision)
    return RunShape(**{**fields, **changes})


def fields_for(command: str) -> list[dataclasses.Field]:
    """The `RunSpec` fields that ``command`` ("train", "bench" or "plan") takes as options, in declaration order."""
    return [f for f in dataclasses.fields(RunSpec) if command in f.metadata["commands"]]


def with_spec(settings_class: type, values: dict[str, Any], command: str) -> Any:
    """A settings dataclass of ``command`` (bench's, plan's) that holds a ``spec``, from flat ``values``: those that
    are `RunSpec` fields ``command`` takes go to its spec, the others to its own fields."""
    spec_names = {f.name for f in fields_for(command)}
    spec = RunSpec(**{k: v for k, v in values.items() if k in spec_names})
    return settings_class(spec=spec, **{k: v for k, v in values.items() if k not in spec_names})


def file_values(table: dict[str, Any], settings_class: type, command: str, where: str) -> dict[str, Any]:
    """A settings file's keys (``where`` names it, e.g. "--suite s.toml") as flat values for `with_spec`: each
    converted to its field's type, an unknown key refused; strategy options in an ``[options]`` table."""
    spec_names = {f.name for f in fields_for(command)} - {"options"}
    own = {f.name for f in dataclasses.fields(settings_class)} - {"spec"}
    table = dict(table)
    options = table.pop("options", {})
    if not isinstance(options, dict):
        raise AdaptersError(f"{where}: `options` must be a table, e.g. [options] r = 8.")
    unknown = [k for k in table if k.replace("-", "_") not in own | spec_names]
    if unknown:
        known = ", ".join(k.replace("_", "-") for k in [*sorted(own), *sorted(spec_names)])
        raise AdaptersError(f"{where}: unknown key {unknown[0]!r}. Known keys: {known}, [options].")
    mine = {k: v for k, v in table.items() if k.replace("-", "_") in own}
    return {**settings_values(mine, settings_class, where),
            **settings_values({k: v for k, v in table.items() if k not in mine}, RunSpec, where), "options": options}


@dataclass
class Run:
    """A `RunSpec` resolved and checked against the registry, the model and the data."""

    spec: RunSpec
    strategy: Strategy
    plugin: str
    config: Any
    quantization: str
    task: str
    model: ModelSpec
    dataset: Dataset | None  # None when resolved without data
    learning_rate: float
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    # With --memory-limit: what `adapters.plan.fit` chose and why (JSON); ``spec`` then holds the choice.
    fit: dict[str, Any] | None = None

    def chosen(self) -> dict[str, Any]:
        """What resolving decided beyond the spec: the quantization, the task, the optimization, the options."""
        return {"quantization": self.quantization, "task": self.task, "learning_rate": self.learning_rate,
                "lr_scheduler": self.lr_scheduler, "warmup_steps": self.warmup_steps,
                "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm,
                "options": dataclasses.asdict(self.config)}


def spec_from(config_file: str | None, given: dict[str, Any], options: dict[str, Any]) -> RunSpec:
    """A spec from a TOML file (optional), overridden by ``given`` values and ``options``.

    The file's keys are `RunSpec` field names (hyphens or underscores); strategy options go in an
    ``[options]`` table.
    """
    values: dict[str, Any] = {}
    file_options: dict[str, Any] = {}
    if config_file:
        table = read_toml(config_file)
        file_options = table.pop("options", {})
        if not isinstance(file_options, dict):
            raise AdaptersError(f"--config {config_file}: `options` must be a table, e.g. [options] r = 8.")
        values = settings_values(table, RunSpec, f"--config {config_file}", nested=("options",))
    values.update(given)
    return RunSpec(**values, options={**file_options, **options})


def split_strategy(spec: str, quantization: str | None) -> tuple[str, str | None]:
    """``"lora@nf4"`` -> ``("lora", "nf4")``; a conflicting --quantization is an error."""
    name, at, quant = spec.partition("@")
    if not at:
        return name, quantization
    if quantization is not None and quantization != quant:
        raise AdaptersError(
            f"--strategy {spec} asks for {quant} but --quantization says {quantization}. Give only one of them."
        )
    return name, quant


def check_at_least(minimum: int, **values: int) -> None:
    """Each flag (given by its field name) is at least ``minimum``."""
    for name, value in values.items():
        if value < minimum:
            raise AdaptersError(f"--{name.replace('_', '-')} must be at least {minimum}, not {value}.")


def check_known_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise AdaptersError(f"unknown quantization {quantization!r}. Use one of: {', '.join(QUANTIZATIONS)}.")


def check_sharding(sharding: str, quantization: str, compile: bool | None) -> None:
    """--sharding: known, and not with what FSDP cannot shard here."""
    if sharding not in SHARDINGS:
        raise AdaptersError(f"--sharding {sharding!r} is not one of: {', '.join(SHARDINGS)}.")
    if sharding == "fsdp" and quantization != "none":
        raise AdaptersError(
            f"--sharding fsdp cannot shard a {quantization}-quantized base: bitsandbytes' packed weights need "
            "FSDP-QLoRA's storage settings (bnb_4bit_quant_storage in the weights' dtype, on CUDA), which adapters "
            "does not set up. Use --quantization none, or drop --sharding fsdp (data parallelism).")
    if sharding == "fsdp" and compile:
        raise AdaptersError("--sharding fsdp with --compile is not supported: drop --compile.")


def memory_limit(size: str | None) -> int | None:
    """--memory-limit in bytes (None: not given); a size that cannot be read, or is not positive, names the flag."""
    from .text import parse_size

    if size is None:
        return None
    try:
        limit = parse_size(str(size))
    except AdaptersError as exc:
        raise AdaptersError(f"--memory-limit: {exc}") from None
    if limit < 1:
        raise AdaptersError(f"--memory-limit {size}: give a size above 0, e.g. --memory-limit 6GiB.")
    return limit


class StrategyRefused(AdaptersError):
    """The run asks for what its strategy declares it cannot do: a quantization, a task, or
    gradient checkpointing. train stops with it; plan and bench show it as a row."""

    def __init__(self, message: str, strategy: Strategy, quantization: str) -> None:
        super().__init__(message)
        self.strategy = strategy
        self.quantization = quantization
