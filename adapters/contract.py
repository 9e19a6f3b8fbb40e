"""The strategy contract: what a plugin implements, and the types it works with.

A strategy is any object with the six members of `Strategy`. Everything else is optional:

- the optional settings of `StrategyBase` (its typed class attributes, with the core's defaults);
  a strategy that does not subclass it gets those defaults too, through `traits`;
- one small Protocol per optional capability: `SavesOwnFormat` (its own files, e.g. PEFT's),
  `DeclaresTrainable` (how many parameters ``apply`` will leave trainable), `EstimatesMemory`
  (its part of a step's memory, for ``adapters plan``), `RefusesModels` (the model families it
  cannot apply to, told from their config), `RefusesRuns` (the runs its options cannot train: a device,
  a quantization), `GroupsParameters` (optimizer parameter groups of their own, e.g. another learning
  rate) and `InitialisesFromData` (initial weights computed from the run's training batches). The core
  checks for a capability with ``isinstance(strategy, SavesOwnFormat)``;
- the shape types an estimate works with: `ModelShape`, `LinearShape`, `RunShape`, and the
  `StrategyMemory` it returns.

This module imports no torch: listing strategies stays fast.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .rules import Engine, autocasts, base_dtype, engine, weights_dtype

if TYPE_CHECKING:
    import torch

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
TASKS = ("causal-lm", "sequence-classification")
GRADIENT_FLOWS = ("inputs", "weights", "head")
LR_SCHEDULERS = ("constant", "linear", "cosine")


@runtime_checkable
class Strategy(Protocol):
    """What a plugin registers. Only these six members are required.

    ``apply`` receives the base model (a transformers model, possibly quantized by bitsandbytes)
    and an instance of ``config_class``. It returns the model to train, with exactly the parameters
    to train left ``requires_grad=True`` and everything else frozen. It must raise
    `adapters.AdaptersError` (leaving the model untouched) when the config cannot apply to it.
    """

    name: str  # lowercase words joined by hyphens, e.g. "lora"
    description: str  # one line
    config_class: type  # a dataclass whose fields all have types and defaults
    supported_quantization: frozenset[str]  # a subset of QUANTIZATIONS
    supported_tasks: frozenset[str]  # a subset of TASKS

    def apply(self, model: torch.nn.Module, config: Any) -> torch.nn.Module: ...


@dataclass(frozen=True)
class Traits:
    """A strategy's optional settings, as the core reads them (see `traits`)."""

    # Quantization used when the user names the strategy without --quantization.
    default_quantization: str = "none"
    # False makes --gradient-checkpointing a configuration error for this strategy.
    supports_gradient_checkpointing: bool = True
    # AdamW learning rate used when the user gives none.
    default_learning_rate: float = 1e-4
    # The schedule, warm-up, weight decay and gradient clipping used when the user gives none.
    default_lr_scheduler: str = "cosine"  # one of LR_SCHEDULERS
    default_warmup_ratio: float = 0.0  # a fraction of the optimizer steps
    default_weight_decay: float = 0.0
    default_max_grad_norm: float = 1.0  # 0 turns clipping off
    # Training FLOPs per token in units of the base's parameter count N, for MFU: 6 when every
    # weight trains, ~4 when the base is frozen but backward runs through it, ~2 for forward only.
    flops_per_token_factor: float = 4


class StrategyBase:
    """A base class for strategies: the optional settings as typed class attributes, with defaults.

    Subclass it and override what differs (``default_learning_rate = 2e-4``); the six members of
    `Strategy` are still yours to define. Subclassing is optional: `traits` gives any strategy
    these defaults.
    """

    default_quantization: str = Traits.default_quantization
    supports_gradient_checkpointing: bool = Traits.supports_gradient_checkpointing
    default_learning_rate: float = Traits.default_learning_rate
    default_lr_scheduler: str = Traits.default_lr_scheduler
    default_warmup_ratio: float = Traits.default_warmup_ratio
    default_weight_decay: float = Traits.default_weight_decay
    default_max_grad_norm: float = Traits.default_max_grad_norm
    flops_per_token_factor: float = Traits.flops_per_token_factor


def traits(strategy: Strategy) -> Traits:
    """The optional settings of ``strategy``, with the core's default for each one it leaves out."""
    return Traits(**{f.name: getattr(strategy, f.name, f.default) for f in dataclasses.fields(Traits)})


# ------------------------------------------------------------------------------- capabilities


@runtime_checkable
class SavesOwnFormat(Protocol):
    """A strategy that writes its trained weights in its own format (PEFT's, for example).

    Without it the core saves every trainable parameter in ``weights.safetensors`` and loads it
    back strictly by name. ``load`` gets a fresh base and returns the model with the weights in it.
    """

    def save(self, model: torch.nn.Module, directory: Path, config: Any) -> None: ...

    def load(self, model: torch.nn.Module, directory: Path, config: Any) -> torch.nn.Module: ...


@runtime_checkable
class DeclaresTrainable(Protocol):
    """A strategy that says, before ``apply``, how many parameters it will leave trainable.

    Benchmarks and ``adapters check`` flag a disagreement with what ``apply`` really did. Return
    None when the count is not the strategy's to know (e.g. a width a library chooses).
    """

    def expected_trainable_parameters(self, model: torch.nn.Module, config: Any) -> int | None: ...


@runtime_checkable
class EstimatesMemory(Protocol):
    """A strategy that predicts its part of a training step's memory, for ``adapters plan``.

    ``model`` is a `ModelShape` (config numbers and a weightless skeleton on the meta device);
    ``run`` the batch and device. Return None rather than a guess when the strategy cannot tell.
    """

    def estimate_memory(self, model: ModelShape, config: Any, run: RunShape) -> StrategyMemory | None: ...


@runtime_checkable
class RefusesModels(Protocol):
    """A strategy that can tell from a model's config alone that it cannot apply to it (a family
    whose layers it does not know how to adapt).

    ``model_config`` is the base's transformers config; nothing is loaded yet. Return why not, as one
    sentence naming what the model lacks, or None when the strategy can apply. train then stops
    before loading (`StrategyRefused`), and plan and bench show a refused row.
    """

    def refuses_model(self, model_config: Any) -> str | None: ...


@runtime_checkable
class RefusesRuns(Protocol):
    """A strategy whose options rule out some runs: a device, a quantization, sharding (e.g. an
    initialisation that only a CUDA library can compute).

    ``run`` is the `RunShape` of the run about to start (its ``device`` the one it will train on) or
    being planned. Return why not, as one sentence naming the option at fault and one fix, or None when
    the run can go ahead. train stops before the base loads (`adapters.StrategyRefused`), and plan and
    bench show a refused row.
    """

    def refuses_run(self, config: Any, run: RunShape) -> str | None: ...


@runtime_checkable
class GroupsParameters(Protocol):
    """A strategy that gives the optimizer parameter groups of its own (e.g. a higher learning rate
    for some weights, as LoRA+ gives LoRA's B matrices).

    ``model`` is what ``apply`` (or ``apply_with_data``) returned; ``learning_rate`` the run's. Return
    torch's parameter groups (dicts with ``"params"`` and, each its own, ``"lr"`` or
    ``"weight_decay"``) that together hold every trainable parameter exactly once; the run's schedule
    scales each group's rate alike. Without it every trainable parameter is in one group.
    """

    def parameter_groups(self, model: torch.nn.Module, config: Any,
                         learning_rate: float) -> list[dict[str, Any]]: ...


@runtime_checkable
class InitialisesFromData(Protocol):
    """A strategy whose initial weights are computed from the run's own training data (EVA, CorDA).

    ``data_batches`` says how many of the run's training batches it needs with ``config`` (0: none,
    and ``apply`` is used as usual). When it needs some, a training session calls ``apply_with_data``
    instead of ``apply``, with that many batches (dicts of tensors, as the training step gets them,
    on the model's device); it returns the model to train, as ``apply`` does. ``apply`` alone must
    still give the same structure (plans and checks use it on a weightless model).
    """

    def data_batches(self, config: Any) -> int: ...

    def apply_with_data(self, model: torch.nn.Module, config: Any,
                        batches: list[dict[str, torch.Tensor]]) -> torch.nn.Module: ...


@runtime_checkable
class Merges(Protocol):
    """A strategy whose trained weights fold into the base, for ``adapters merge``.

    ``merge`` gets the trained model (as ``apply`` or ``load`` returned it, on an unquantized base in
    the compute dtype: the core dequantizes first) and returns a plain transformers model of the
    base's class with the trained weights folded in, with no wrapper or extra module left, so that
    ``AutoModelFor....from_pretrained`` loads its saved copy with no PEFT and no adapters code. Raise
    `adapters.AdaptersError` with the reason when this model or config cannot be merged. A strategy
    without it is refused by ``adapters merge``, naming the strategy; it may say why in a class
    attribute ``merge_refusal`` (a clause), which ``adapters merge`` and the kit print.
    """

    def merge(self, model: torch.nn.Module, config: Any) -> torch.nn.Module: ...


@runtime_checkable
class ImportsPeft(Protocol):
    """A strategy that reads adapters saved by plain PEFT, for ``adapters import``.

    ``peft_types`` names the PEFT types it reads (``PeftType`` values such as ``"LORA"``).
    ``options_from_peft`` turns the directory's ``adapter_config.json`` (a dict, read as plain JSON)
    into an instance of ``config_class`` that, with the strategy's own ``load``, restores those
    weights exactly; raise `adapters.AdaptersError` naming the key it cannot express.
    """

    peft_types: frozenset[str]

    def options_from_peft(self, peft_config: dict[str, Any]) -> Any: ...


def run_refusal(strategy: Strategy, config: Any, run: RunShape) -> str | None:
    """Why ``strategy`` with ``config`` cannot train ``run`` (`RefusesRuns`), or None."""
    return strategy.refuses_run(config, run) if isinstance(strategy, RefusesRuns) else None


def declared_trainable(strategy: Strategy, model: torch.nn.Module, config: Any) -> int | None:
    """The trainable count ``strategy`` declares for ``model`` before apply, or None."""
    if not isinstance(strategy, DeclaresTrainable):
        return None
    return strategy.expected_trainable_parameters(model, config)


# ------------------------------------------------------------------------------- shape types


_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class RunShape:
    """The run a memory estimate is for: what the batch looks like and where it runs."""

    batch_size: int
    seq_len: int
    task: str = "causal-lm"
    quantization: str = "none"
    gradient_checkpointing: bool = False
    device: str = "cuda"  # "cuda": bf16 weights under bf16 autocast; "cpu": fp32, as adapters train runs
    loss_chunk: int | None = None  # causal-lm loss in chunks of this many tokens; 0: whole logits; None: the default
    compile: bool | None = None  # decoder layers under torch.compile; None: the device's default (adapters.rules)
    processes: int = 1  # the estimate is one process's of a run of this many, batch_size rows each
    sharding: str = "none"  # "none": each process holds the whole model (DDP); "fsdp": 1/processes of it (FSDP2)
    optimizer: str = "adamw"  # adapters.rules.OPTIMIZERS: "adamw", or bitsandbytes' "adamw8bit", "paged_adamw8bit"
    offload_activations: bool = False  # saved activations in host memory during the step (CUDA only)
    optimizer_in_backward: bool = False  # each weight stepped in backward: at most one gradient alive at a time
    master_weights: str = "fp32"  # adapters.rules.MASTER_WEIGHTS: "fp32" masters of what trains, or "none" (bf16)
    mixed_precision: str | None = None  # adapters.rules.MIXED_PRECISION: "bf16" autocast or "no"; None: by device
    # With gradient_checkpointing: how many decoder layers are checkpointed, the first ones; None: every layer.
    checkpoint_layers: int | None = None

    @property
    def engine(self) -> Engine:
        """How this run computes (`adapters.rules`): compiled or not, MLP recompute, optimizer, loss path."""
        return engine(self.device, self.task, compile=self.compile, sharding=self.sharding,
                      gradient_checkpointing=self.gradient_checkpointing, checkpoint_layers=self.checkpoint_layers,
                      loss_chunk=self.loss_chunk, optimizer_kind=self.optimizer)

    @property
    def recomputes_mlp(self) -> bool:
        """Whether gated MLPs recompute their activation and product in backward instead of keeping the
        activation's output (`adapters.rules.recomputes_mlp`)."""
        return self.engine.recomputes_mlp

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    def checkpointed_layers(self, num_layers: int) -> int:
        """How many of a model's ``num_layers`` decoder layers recompute their activations in backward: none
        without checkpointing, the first ``checkpoint_layers`` with it (every layer when that is None)."""
        if not self.gradient_checkpointing:
            return 0
        return num_layers if self.checkpoint_layers is None else min(self.checkpoint_layers, num_layers)

    @property
    def autocast(self) -> bool:
        """Whether the run computes under bf16 autocast (`adapters.rules.autocasts`): on CUDA unless asked
        otherwise, on the CPU with ``mixed_precision="bf16"``. Trained float32 weights are then cast to bf16 where
        they are used, and what they compute is bf16."""
        return autocasts(self.device, self.mixed_precision)

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of weights and activations in the compute dtype (bf16 under autocast, fp32 on the CPU
        without it; bf16 everywhere with ``master_weights="none"``): `adapters.rules.base_dtype`."""
        return _BYTES[base_dtype(self.device, self.master_weights, self.mixed_precision)]

    @property
    def master_bytes(self) -> int:
        """Bytes per element of a base weight the strategy trains: float32 on every device, since the
        core keeps float32 master weights of trainable weights that a bf16 base loaded in bf16; bf16 with
        ``master_weights="none"`` (`adapters.rules.weights_dtype`)."""
        return _BYTES[weights_dtype(self.device, self.master_weights, self.mixed_precision)]

    @property
    def dropout_mask_bytes(self) -> int:
        """Bytes per element of a dropout mask: a bool on CUDA, a scaled float noise tensor on the CPU."""
        return 1 if self.device == "cuda" else 4


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of a decoder layer, as an estimate sees it."""

    name: str  # the leaf name, e.g. "q_proj"
    in_features: int
    out_features: int
    input_group: str  # linears that read the same tensor share a group (q/k/v; gate/up)
    input_kept: bool = False  # whether the frozen base already keeps its input for backward


@dataclass
class ModelShape:
    """A model as an estimate sees it: config numbers and a weightless skeleton."""

    name: str
    config: Any
    task: str
    meta_model: torch.nn.Module  # on the meta device: shapes and module names, no data
    family: str | None  # "llama" (Llama-style decoders) or "bert" (BERT-style encoders); None: not modelled
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_labels: int
    attention: str  # "sdpa", "eager", "flash_attention_2", ...
    layer_linears: list[LinearShape] = field(default_factory=list)  # one decoder layer's linear layers
    weights_cache: dict = field(default_factory=dict, repr=False)

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class StrategyMemory:
    """A strategy's own part of a step's memory: what ``estimate_memory`` returns.

    - ``trainable_parameters``/``trainable_bytes``: what it trains, and their size as trained
      (LoRA keeps fp32 adapters over a bf16 base; full fine-tuning trains the base's own dtype).
    - ``largest_trainable_tensor_bytes``: the CPU's AdamW makes two temporaries of each tensor in turn.
    - ``gradient_flow``: "inputs" when gradients flow back through the frozen base's layers (LoRA,
      prefix tuning), "weights" when the base's own weights train (full fine-tuning), "head" when only
      a head on the final hidden state trains (a probe).
    - ``base_parameters_trained``: how many of the base's own parameters it makes trainable; they
      count as trainable, not as base weights.
    - ``layer_activation_bytes``: what its own modules save for backward in one decoder layer.
    - ``extra_attention_tokens``: key/value positions it adds to every attention (prefix tuning).
    - ``optimizer_state_bytes``: None means AdamW's two moments, twice ``trainable_bytes``.
    """

    trainable_parameters: int
    trainable_bytes: int
    largest_trainable_tensor_bytes: int
    gradient_flow: str = "inputs"
    base_parameters_trained: int = 0
    layer_activation_bytes: int = 0
    extra_attention_tokens: int = 0
    optimizer_state_bytes: int | None = None


# ------------------------------------------------------------------------------- validation

_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


def validate_strategy(strategy: Any) -> list[str]:
    """Problems with a strategy object's declaration; empty when it satisfies the contract."""
    problems = []
    for attr in ("name", "description", "config_class", "supported_quantization", "supported_tasks"):
        if not hasattr(strategy, attr):
            problems.append(f"has no `{attr}`")
    if not callable(getattr(strategy, "apply", None)):
        problems.append("has no `apply(model, config)` method")
    if problems:
        return problems
    if not isinstance(strategy.name, str) or not _NAME.fullmatch(strategy.name):
        problems.append(f"name {strategy.name!r} is not lowercase words joined by hyphens")
    if not dataclasses.is_dataclass(strategy.config_class):
        problems.append("config_class is not a dataclass")
    else:
        for f in dataclasses.fields(strategy.config_class):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"config option `{f.name}` has no default")
    unknown_q = set(strategy.supported_quantization) - set(QUANTIZATIONS)
    if unknown_q:
        problems.append(f"supported_quantization has unknown values {sorted(unknown_q)}; use {QUANTIZATIONS}")
    unknown_t = set(strategy.supported_tasks) - set(TASKS)
    if unknown_t:
        problems.append(f"supported_tasks has unknown values {sorted(unknown_t)}; use {TASKS}")
    declared = traits(strategy)
    if declared.default_quantization not in strategy.supported_quantization:
        problems.append("default_quantization is not in supported_quantization")
    if declared.default_lr_scheduler not in LR_SCHEDULERS:
        problems.append(f"default_lr_scheduler {declared.default_lr_scheduler!r} is not one of {LR_SCHEDULERS}")
    if callable(getattr(strategy, "save", None)) != callable(getattr(strategy, "load", None)):
        problems.append("implements only one of save and load; implement both, or neither")
    return problems
