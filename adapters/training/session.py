"""A training session: one run set up once, for train, bench and the conformance kit alike.

`Session.open` makes everything a run needs before its first step, in this order: the Accelerator (bf16 mixed
precision on a GPU; FSDP under ``--sharding fsdp`` or ``accelerate launch --use_fsdp``); the base and the strategy
on it, or restored from saved weights (`adapters.training.model.build`); the tokenized rows of the data and
their loaders, packing included; the decoder compiled where `adapters.rules` says; AdamW in its form for the
device (or one per weight, stepped in backward: `adapters.training.in_backward`); the learning-rate schedule; all
of it prepared by Accelerate. `adapters.train` loops over its steps, ``adapters bench`` times them and measures
their memory, and the kit checks a strategy through them: what bench measures is what train runs.

Its parts: `Stepper` takes the optimizer steps (with the out-of-memory back-off), `State` (local or sharded)
writes and reads checkpoints and gives the whole model back, `Health` checks that everything stays finite.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import engine, rules
from ..batches import make_batches, real_tokens
from ..checkpoints import Position
from ..contract import GroupsParameters, run_refusal
from ..distributed import fsdp_plugin, is_sharded, launched_with_fsdp
from ..errors import AdaptersError
from ..nn import ParameterCount, count_parameters
from ..loading import BaseModel
from ..runspec import Run, StrategyRefused, run_shape
from .evaluate import evaluate
from .health import Health
from .in_backward import InBackward
from .model import Built, build
from .prepared import Prepared
from .sharded import ShardedState
from .state import LocalState, State
from .step import Stepper


def make_accelerator(log_with: list[str] | None = None, project_dir: str | Path | None = None,
                     sharding: str = "none", mixed_precision: str | None = None):
    """bf16 mixed precision on GPU, full precision on the CPU, unless ``mixed_precision`` says otherwise
    (`adapters.rules.autocasts`); ``log_with`` names Accelerate's trackers.

    ``sharding="fsdp"`` sets up what ``accelerate launch --use_fsdp`` would (`fsdp_plugin`). A run started by
    ``accelerate launch`` with FSDP configured gets Accelerate's own plugin whatever ``sharding`` says.
    Gradient accumulation is the session's (`adapters.training.step.optimizer_step`), not Accelerate's: its losses
    are never divided again.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType

    cuda = torch.cuda.is_available()
    if not cuda and launched_with_fsdp():  # Accelerate would ignore its own --use_fsdp on the CPU
        sharding = "fsdp"
    plugin = fsdp_plugin() if sharding == "fsdp" else None
    precision = "bf16" if rules.autocasts("cuda" if cuda else "cpu", mixed_precision) else "no"
    _precision_afresh(precision)
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=not cuda,  # without it, processes started by torchrun on a CPU machine would not join one group
        # Each epoch's order follows from the seed and the epoch alone, so a resumed run can find its place.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=log_with or None, project_dir=project_dir, fsdp_plugin=plugin,
    )
    if plugin is not None and accelerator.distributed_type != DistributedType.FSDP:
        # Accelerate turns FSDP on for accelerators only; FSDP2 itself shards over gloo on the CPU as well.
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def _precision_afresh(precision: str) -> None:
    """Accelerate keeps one state per process, set by its first Accelerator, and refuses another mixed precision
    after it: a later run in the same process that asks for another (``--mixed-precision``) starts its state
    afresh. The process's own state (devices, process group) stays."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


@dataclass
class Session(Prepared):
    """One run, set up and ready to step (see the module's docstring)."""

    train_loader: Any
    eval_loader: Any  # None: the data has no held-out split
    engine: rules.Engine  # how it computes, as the rules decided for its device
    parameters: ParameterCount
    precision: dict[str, Any]  # the dtypes it trains in (`Built.precision`)
    state: State = field(init=False)
    stepper: Stepper = field(init=False)
    health: Health = field(init=False)

    def __post_init__(self) -> None:
        self.state = (ShardedState if is_sharded(self.model) else LocalState)(self)
        self.stepper = Stepper(self)
        self.health = Health(self.state.non_finite_weight)

    @classmethod
    def open(cls, run: Run, *, accelerator: Any = None, checkpoint: Path | None = None,
             saved: Path | None = None) -> Session:
        """Set ``run`` up (``accelerator``: one made for it by default), its strategy applied afresh, or restored
        from ``checkpoint``'s weights or from the final save in ``saved``."""
        accelerator = accelerator or make_accelerator(sharding=run.spec.sharding,
                                                      mixed_precision=run.spec.mixed_precision)
        if run.spec.sharding == "none" and accelerator.distributed_type == "FSDP":  # `accelerate launch --use_fsdp`
            run = dataclasses.replace(run, spec=dataclasses.replace(run.spec, sharding="fsdp"))
        s = run.spec
        if s.offload_activations and (reason := rules.offload_refusal(accelerator.device.type)):
            raise AdaptersError(reason)  # before loading
        shape = run_shape(s, run.task, run.quantization, accelerator.device.type)
        if reason := run_refusal(run.strategy, run.config, shape):
            raise StrategyRefused(reason, run.strategy, run.quantization)  # before loading
        built = build(run, accelerator.device, checkpoint=checkpoint, saved=saved,
                      data=lambda base: _loaders(run, base)[0])
        model = built.model
        parameters = count_parameters(model)
        train_loader, eval_loader = _loaders(run, built.base)
        choice = shape.engine
        make_optimizer = InBackward if s.optimizer_in_backward else engine.make_optimizer
        optimizer = make_optimizer(_parameter_groups(run, model), run.learning_rate, run.weight_decay,
                                   accelerator.device, kind=s.optimizer)
        compiled = {"on": choice.compiled, "layers": engine.compile_layers(model) if choice.compiled else 0,
                    "error": None}
        scheduler = _schedule(run, optimizer, accelerator.num_processes)
        if s.optimizer_in_backward:  # its state is written as safetensors (`LocalState`), never by Accelerate
            model, train_loader, scheduler = accelerator.prepare(model, train_loader, scheduler)
        else:
            model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
        if eval_loader is not None:
            eval_loader = accelerator.prepare(eval_loader)
        # Checkpoints hold the trainable weights in the strategy's format, not the frozen base.
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
        model.train()
        autocast = None if accelerator.mixed_precision == "no" else accelerator.mixed_precision
        return cls(run, accelerator, built, model, optimizer, scheduler, compiled, train_loader, eval_loader, choice,
                   parameters, built.precision(autocast))

    def batches(self, position: Position) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Each optimizer step's micro-batches, from where ``position`` is, epoch after epoch; the position
        follows them."""
        from accelerate import skip_first_batches

        s = self.run.spec

        def micro_batches() -> Iterator[dict[str, torch.Tensor]]:
            while True:
                self.train_loader.set_epoch(position.epoch)
                source = (skip_first_batches(self.train_loader, position.batch) if position.batch
                          else self.train_loader)
                for batch in source:
                    position.batch += 1
                    yield batch
                position.epoch, position.batch = position.epoch + 1, 0

        source = micro_batches()
        while True:
            yield [next(source) for _ in range(s.gradient_accumulation_steps)]

    def evaluate(self) -> dict[str, float | None]:
        """The held-out metrics now (uncompiled: compiling for a few held-out batches would cost more than it
        saves); the model is left in train mode. None for each where the data has no held-out split."""
        with engine.eager():
            return evaluate(self.model, self.eval_loader or [], self.run.task, self.accelerator,
                            self.run.spec.eval_batches, self.run.spec.loss_chunk)

    def trainable_shapes(self) -> dict[str, list[int]]:
        """Each trainable weight's name and shape, as the optimizer holds them (what a checkpoint must match)."""
        return {n: list(p.shape) for n, p in self.built.model.named_parameters() if p.requires_grad}

    def check_resumes(self, checkpoint: Path, position: Position) -> None:
        """Refuse a checkpoint whose trainable weights are not what this session trains."""
        if self.trainable_shapes() != position.trainable:  # e.g. PEFT's prefix with projection saves for inference
            raise AdaptersError(f"{checkpoint}: strategy {self.run.strategy.name!r} restores other trainable weights "
                                "than the run trained (it saves these options for inference), so this run cannot "
                                "be resumed. Start it again without --resume.")


def _parameter_groups(run: Run, model: torch.nn.Module) -> list[Any]:
    """The optimizer's parameters: the strategy's own groups (`adapters.GroupsParameters`), each trainable
    parameter in exactly one; else every trainable parameter in one group."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not isinstance(run.strategy, GroupsParameters):
        return trainable
    groups = run.strategy.parameter_groups(model, run.config, run.learning_rate)
    grouped = [id(p) for group in groups for p in group["params"]]
    if sorted(grouped) != sorted(map(id, trainable)):
        raise AdaptersError(f"strategy {run.strategy.name!r}: parameter_groups must hold every trainable parameter "
                            f"exactly once ({len(grouped)} grouped, {len(trainable)} trainable); fix the plugin.")
    return groups


def _loaders(run: Run, base: BaseModel) -> tuple[Any, Any]:
    """The training rows (packed or padded as the run says) and the held-out rows (None without a held-out split),
    one example a row and always masked, so that the held-out loss is on completions whatever the training. Loaders
    draw their workers' seeds from their own generators, never from the global one that dropout uses, so where a
    run is resumed does not change its random numbers."""
    s = run.spec
    train_set = make_batches(run.dataset.train, base, s.seq_len, "train", packing=bool(s.packing),
                             train_on_prompt=s.train_on_prompt)
    train = torch.utils.data.DataLoader(train_set, batch_size=s.batch_size, shuffle=True, collate_fn=train_set.collate,
                                        generator=torch.Generator().manual_seed(s.seed))
    if not run.dataset.heldout:
        return train, None
    eval_set = make_batches(run.dataset.heldout, base, s.seq_len, "held-out")
    held_out = torch.utils.data.DataLoader(eval_set, batch_size=s.batch_size, collate_fn=eval_set.collate,
                                           generator=torch.Generator().manual_seed(s.seed))
    return train, held_out


def _schedule(run: Run, optimizer: torch.optim.Optimizer, processes: int) -> Any:
    """The learning-rate schedule (``transformers.get_scheduler``); Accelerate steps a prepared schedule once per
    process per optimizer step. transformers' plain "constant" ignores the warm-up; its "constant_with_warmup" is
    the same without one."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if run.lr_scheduler == "constant" else run.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=run.warmup_steps * processes,
                         num_training_steps=run.spec.max_steps * processes)


def tokens_of(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor | int:
    """The real tokens of a step's micro-batches, on their device (`adapters.batches.real_tokens`)."""
    return sum(real_tokens(batch) for batch in batches)

