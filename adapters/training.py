"""The pieces of a training run that train, bench and the kit share: the Accelerator, loading the
base and applying the strategy, tokenized batches, one optimizer step, held-out evaluation.

`adapters.trainer.train` puts them together into the loop.

Precision: on a GPU the base is loaded in bf16 and computes under bf16 autocast, but the weights a
strategy trains are kept in float32 (`keep_float32_trainable`, called by `build`): master weights,
so that updates smaller than bf16's resolution (about 1/128 of a weight's size; a learning rate of
1e-5 gives far smaller ones) accumulate instead of rounding away. This is the usual mixed-precision
recipe, rather than pure bf16 training. It costs memory where a strategy trains weights of the
base itself (full fine-tuning, a probe's head, norms): 4 bytes a weight instead of 2, and the same
again for their gradients and for each of AdamW's two moments, which follow the weights' dtype.
LoRA's adapter weights are float32 already (PEFT keeps them so), so nothing changes for them. A
completed run rounds the master weights back to the dtype the strategy gave them (`restore_dtypes`)
before its final evaluation and save, so the result is what ``adapters.load`` gives back;
checkpoints keep them in float32, so a resumed run continues from them exactly. On the CPU the base
is float32 and nothing changes.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from . import batches, engine
from . import data as datasets
from . import loss as losses
from .contract import declared_trainable
from .errors import AdaptersError, TrainingFailed
from .loading import BaseModel, load_base_model
from .nn import count_parameters
from .runspec import Run


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn checkpointing on so that it really engages with a frozen base.

    Non-reentrant checkpointing plus input gradients lets gradients flow through checkpointed
    segments whose own weights are all frozen; the loop keeps the model in train mode, without
    which transformers silently skips checkpointing.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Newer transformers already hook the input embeddings above; enabling twice would orphan the
    # first hook, which then could never be removed (as the linear probe must).
    with contextlib.suppress(AttributeError):
        model.disable_input_require_grads()
    model.enable_input_require_grads()


class _Tensors(torch.utils.data.Dataset):
    """Rows of equal-length tensors; ``trim``: rows are right-padded, and `collate` cuts a batch's columns of
    padding alone (a DataLoader's ``collate_fn``)."""

    def __init__(self, trim: bool = False, **tensors: torch.Tensor) -> None:
        self.tensors = tensors
        self.trim = trim

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def collate(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([row[k] for row in rows]) for k in rows[0]}
        if self.trim:  # a batch of short examples computes only as long as its longest
            width = int(batch["attention_mask"].sum(dim=1).max())
            batch = {k: v[:, :width] for k, v in batch.items()}
        return batch


def make_batches(examples: list[datasets.Example], base: BaseModel, seq_len: int, what: str, *,
                 packing: bool = False, train_on_prompt: bool = False) -> _Tensors:
    """Tokenized tensors for the base's task and the examples' shape (`adapters.data`).

    Documents: concatenated blocks of ``seq_len``. Instruction and chat examples: labels on the completions
    alone (all the tokens with ``train_on_prompt``), one example a right-padded row, or with ``packing`` several a
    row, attention kept within each example by position ids that restart. Labelled text: one padded row each.
    """
    try:
        if base.task != "causal-lm":
            ids, mask, labels = batches.classification_batch_tensors(examples, base.labels, base.tokenizer, seq_len)
            return _Tensors(input_ids=ids, attention_mask=mask, labels=labels)
        if not batches.is_instruction(examples):
            blocks = batches.causal_lm_blocks([e.text for e in examples], base.tokenizer, seq_len)
            return _Tensors(input_ids=blocks, labels=blocks)
        rows = batches.instruction_rows(examples, base.tokenizer, seq_len, train_on_prompt)
        pad = batches.pad_id(base.tokenizer)
        if packing:
            check_packing(base)
            return _Tensors(**batches.packed(rows, seq_len, pad))
        return _Tensors(trim=True, **batches.padded(rows, seq_len, pad))
    except datasets.DataError as exc:
        raise datasets.DataError(f"{what} split: {exc}") from None


def check_packing(base: BaseModel) -> None:
    """Packed rows need a model that takes position ids: without them attention would cross from one example
    into the next. (They also need the model to run without a key/value cache, as `load_base` sets it: with one,
    transformers does not look for packed rows.)"""
    import inspect

    if "position_ids" not in inspect.signature(base.model.forward).parameters:
        raise datasets.DataError(f"--model {base.name}: its forward takes no position ids, which keep packed "
                                 "examples apart; pass --no-packing")


@torch.no_grad()
def evaluate(model, loader, task: str, accelerator, max_batches: int,
             loss_chunk: int | None = None) -> dict[str, float | None]:
    """Held-out loss and perplexity (causal-lm) or loss and accuracy (classification).

    The loss is a mean over the tokens the labels train (causal-lm: the completions of instruction data) or
    over the examples (classification), whatever the batches' sizes. Each is None when nothing was measured
    (``max_batches`` 0), never 0. A value may be NaN or infinite; the caller decides what that means.
    The causal-lm loss is computed in chunks of ``loss_chunk`` tokens (`adapters.loss`), which changes no
    value beyond float rounding and holds no [tokens x vocab] logits.
    """
    names = ("loss", "perplexity") if task == "causal-lm" else ("loss", "accuracy")
    if max_batches < 1:
        return dict.fromkeys(names)
    was_training = model.training
    model.eval()
    total_loss = total_weight = correct = count = 0.0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        if task == "causal-lm":
            with accelerator.autocast():  # the head's chunks too, not only the model's own forward
                batch_loss = losses.loss(model, batch, loss_chunk)
        else:
            out = model(**batch)
            batch_loss = out.loss
        weight = _loss_weight(batch, task).to(batch_loss.device)
        loss, weight = accelerator.gather_for_metrics((batch_loss.detach() * weight, weight))
        total_loss += float(loss.sum())
        total_weight += float(weight.sum())
        if task == "sequence-classification":
            pred, gold = accelerator.gather_for_metrics((out.logits.argmax(-1), batch["labels"]))
            correct += float((pred == gold).sum())
            count += pred.numel()
    model.train(was_training)
    if not total_weight:  # an empty held-out split
        return dict.fromkeys(names)
    mean = total_loss / total_weight
    if task == "causal-lm":
        return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)) if math.isfinite(mean) else mean}
    return {"loss": mean, "accuracy": correct / max(count, 1.0)}


def _loss_weight(batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """What ``batch``'s mean loss averages over: the labels the loss predicts (causal-lm), or the rows."""
    if task == "causal-lm":
        return (batch["labels"][:, 1:] != datasets.IGNORE_INDEX).sum().float()
    return torch.tensor(float(batch["input_ids"].shape[0]))


def make_accelerator(log_with: list[str] | None = None, project_dir: str | Path | None = None,
                     sharding: str = "none"):
    """bf16 mixed precision on GPU, full precision on the CPU; ``log_with`` names Accelerate's trackers.

    ``sharding="fsdp"`` sets up what ``accelerate launch --use_fsdp`` would (`fsdp_plugin`). A run started by
    ``accelerate launch`` with FSDP configured gets Accelerate's own plugin whatever ``sharding`` says.
    Gradient accumulation is `optimizer_step`'s, not Accelerate's: its losses are never divided again.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType

    from .sharding import fsdp_plugin, launched_with_fsdp

    cuda = torch.cuda.is_available()
    if not cuda and launched_with_fsdp():  # Accelerate would ignore its own --use_fsdp on the CPU
        sharding = "fsdp"
    plugin = fsdp_plugin() if sharding == "fsdp" else None
    accelerator = Accelerator(
        mixed_precision="bf16" if cuda else "no",
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


def compiles(spec, device: torch.device | str) -> bool:
    """Whether ``spec``'s layers run compiled: as asked, else the device's default (never under sharding)."""
    if spec.compile is not None:
        return spec.compile
    return spec.sharding == "none" and engine.compile_by_default(device)


def load_base(run: Run, device: torch.device) -> BaseModel:
    """The base for ``run``, loaded under its seed and set up for training, before any strategy touches it."""
    from accelerate.utils import set_seed

    s = run.spec
    set_seed(s.seed)
    base = load_base_model(s.model, run.quantization, run.task, run.dataset.labels or None, device)
    # Training never decodes: without this, every forward also fills a key/value cache that holds
    # each layer's keys and values (all of them when nothing else keeps them: a probe, a padded batch).
    base.model.config.use_cache = False
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(base.model)
    compiled = compiles(s, device)
    if engine.recomputes_mlp(s.gradient_checkpointing, compiled):
        engine.recompute_gated_mlps(base.model)
    return base


def build(run: Run, device: torch.device) -> tuple[BaseModel, torch.nn.Module, int | None]:
    """Load the base for ``run`` (`load_base`) and apply its strategy (`apply_strategy`).

    Returns the base, the model to train, and the trainable count the strategy declared for this
    base before applying (None when it declares none).
    """
    base = load_base(run, device)
    model, declared, _ = apply_strategy(run, base)
    return base, model, declared


def apply_strategy(run: Run, base: BaseModel) -> tuple[torch.nn.Module, int | None, dict[str, torch.dtype]]:
    """Apply ``run``'s strategy to ``base`` and keep what it trains as float32 master weights.

    Returns the model, the trainable count the strategy declared (None when it declares none), and
    the dtypes the strategy gave the weights that became float32 (`keep_float32_trainable`).
    """
    declared = declared_trainable(run.strategy, base.model, run.config)
    model = run.strategy.apply(base.model, run.config)
    if count_parameters(model).trainable == 0:
        raise AdaptersError(f"strategy {run.strategy.name!r} left no parameter trainable; check its options.")
    return model, declared, keep_float32_trainable(model)


def keep_float32_trainable(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """Trainable weights in bf16 or fp16 become float32 master weights (see the module's docstring).

    Returns the dtype each one had, by name, for `restore_dtypes`. Tied weights are one parameter
    and stay one.
    """
    cast: dict[str, torch.dtype] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            cast[name] = p.dtype
            p.data = p.data.to(torch.float32)
    return cast


def restore_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Round the master weights that `keep_float32_trainable` made back to the dtypes they had."""
    for name, p in model.named_parameters():
        if name in dtypes:
            p.data = p.data.to(dtypes[name])


def trainable_dtypes(model: torch.nn.Module) -> list[str]:
    """The distinct dtypes of ``model``'s trainable weights, by name: ``["float32"]`` on master weights."""
    return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})


def optimized(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters ``optimizer`` updates."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocator's out-of-memory error: torch's own type, or a RuntimeError saying so (CUDA, MPS, XPU)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _rows(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


def split_batch(batch: dict[str, torch.Tensor], rows: int | None) -> list[dict[str, torch.Tensor]]:
    """``batch`` in pieces of at most ``rows`` rows, in order (None: the batch whole)."""
    if rows is None or _rows(batch) <= rows:
        return [batch]
    pieces = {k: torch.split(v, rows) for k, v in batch.items()}
    return [{k: v[i] for k, v in pieces.items()} for i in range(len(pieces["input_ids"]))]


def optimizer_step(model, batches: list[dict[str, torch.Tensor]], optimizer, accelerator, scheduler=None,
                   max_grad_norm: float = 0.0, micro_batch: int | None = None, step: int | None = None,
                   check_finite: bool = False,
                   loss_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over ``batches`` (the micro-batches it accumulates): forward and backward of
    each, in pieces of at most ``micro_batch`` rows; then clipping, the optimizer and the scheduler.

    Each piece's loss counts by its share of the step's rows, so the update is that of one batch of
    all the rows however they are split (exactly so where the loss is a mean over equal rows, as
    it is here). Gradients are synchronised between processes on the last piece only. Returns the
    step's loss and the gradient norm before clipping (None when no clipping ran), both left on the
    device. ``accelerator`` must not accumulate itself (`make_accelerator` does not).

    A causal LM's loss is computed in chunks of ``loss_chunk`` tokens through its own output head, never
    the whole batch's logits (`adapters.loss`; None: its default chunk, 0: the model's own ``labels=``
    loss); any other model's is its own.

    ``check_finite`` stops at a non-finite loss at once (`TrainingFailed`), at the cost of a host
    synchronisation per piece; the training loop checks at its logging interval instead. An error
    (out of memory, say) leaves gradients behind: clear them with ``optimizer.zero_grad``.
    """
    pieces = [piece for batch in batches for piece in split_batch(batch, micro_batch)]
    rows = sum(_rows(piece) for piece in pieces)
    total = torch.zeros((), device=accelerator.device)
    for i, piece in enumerate(pieces):
        share = _rows(piece) / rows
        with contextlib.nullcontext() if i == len(pieces) - 1 else accelerator.no_sync(model):
            with accelerator.autocast():  # the model's forward has its own; the loss's head chunks need it too
                loss = losses.loss(model, piece, loss_chunk)
            if check_finite and not torch.isfinite(loss):
                raise TrainingFailed(f"loss became {loss.item()} at step {step}; stopped and saved nothing. "
                                     "Lower --learning-rate, or check the data.")
            accelerator.backward(loss * share)
        total += loss.detach().float() * share
    grad_norm = accelerator.clip_grad_norm_(optimized(optimizer), max_grad_norm) if max_grad_norm > 0 else None
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


def training_step(model, batch, optimizer, accelerator, step: int, scheduler=None, max_grad_norm: float = 0.0,
                  check_finite: bool = True, loss_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on one batch (`optimizer_step`), stopping at a non-finite loss by default."""
    return optimizer_step(model, [batch], optimizer, accelerator, scheduler, max_grad_norm, step=step,
                          check_finite=check_finite, loss_chunk=loss_chunk)
