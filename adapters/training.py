"""The pieces of a training run that train, bench and the kit share: the Accelerator, loading the
base and applying the strategy, tokenized batches, one training step, held-out evaluation.

`adapters.trainer.train` puts them together into the loop.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from . import data as datasets
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
    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def make_batches(
    examples: list[datasets.Example], base: BaseModel, seq_len: int, what: str
) -> _Tensors:
    """Tokenized tensors for the base's task."""
    try:
        if base.task == "causal-lm":
            blocks = datasets.causal_lm_blocks([e.text for e in examples], base.tokenizer, seq_len)
            return _Tensors(input_ids=blocks, labels=blocks)
        ids, mask, labels = datasets.classification_batch_tensors(examples, base.labels, base.tokenizer, seq_len)
        return _Tensors(input_ids=ids, attention_mask=mask, labels=labels)
    except datasets.DataError as exc:
        raise datasets.DataError(f"{what} split: {exc}") from None


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


@torch.no_grad()
def evaluate(model, loader, task: str, accelerator, max_batches: int) -> dict[str, float]:
    """Held-out loss and perplexity (causal-lm) or loss and accuracy (classification)."""
    was_training = model.training
    model.eval()
    total_loss = total_weight = correct = count = 0.0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        out = model(**batch)
        weight = torch.tensor(float(batch["input_ids"].shape[0]), device=out.loss.device)
        loss, weight = accelerator.gather_for_metrics((out.loss.detach() * weight, weight))
        total_loss += float(loss.sum())
        total_weight += float(weight.sum())
        if task == "sequence-classification":
            pred, gold = accelerator.gather_for_metrics((out.logits.argmax(-1), batch["labels"]))
            correct += float((pred == gold).sum())
            count += pred.numel()
    model.train(was_training)
    mean = total_loss / max(total_weight, 1.0)
    if task == "causal-lm":
        return {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}
    return {"loss": mean, "accuracy": correct / max(count, 1.0)}


def make_accelerator(gradient_accumulation_steps: int = 1, log_with: list[str] | None = None,
                     project_dir: str | Path | None = None):
    """bf16 mixed precision on GPU, full precision on the CPU; ``log_with`` names Accelerate's trackers."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    cuda = torch.cuda.is_available()
    return Accelerator(
        mixed_precision="bf16" if cuda else "no",
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=not cuda,  # without it, processes started by torchrun on a CPU machine would not join one group
        # Each epoch's order follows from the seed and the epoch alone, so a resumed run can find its place.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=log_with or None, project_dir=project_dir,
    )


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
    return base


def build(run: Run, device: torch.device) -> tuple[BaseModel, torch.nn.Module, int | None]:
    """Load the base for ``run`` (`load_base`) and apply its strategy.

    Returns the base, the model to train, and the trainable count the strategy declared for this
    base before applying (None when it declares none).
    """
    base = load_base(run, device)
    declared = declared_trainable(run.strategy, base.model, run.config)
    model = run.strategy.apply(base.model, run.config)
    if count_parameters(model).trainable == 0:
        raise AdaptersError(f"strategy {run.strategy.name!r} left no parameter trainable; check its options.")
    return base, model, declared


def optimized(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters ``optimizer`` updates."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def training_step(model, batch, optimizer, accelerator, step: int, scheduler=None,
                  max_grad_norm: float = 0.0, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-step: forward, backward, and when accumulation is complete, clipping, an optimizer
    step and a scheduler step. Returns the loss and the gradient norm before clipping (None when no
    clipping ran), both left on the device.

    ``check_finite`` stops at a non-finite loss at once, at the cost of a host synchronisation on
    every micro-step; the training loop checks at its logging interval instead.
    """
    grad_norm = None
    with accelerator.accumulate(model):
        loss = model(**batch).loss
        if check_finite and not torch.isfinite(loss):
            raise TrainingFailed(
                f"loss became {loss.item()} at step {step}; stopped and saved nothing. "
                "Lower --learning-rate, or check the data."
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(optimized(optimizer), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm
