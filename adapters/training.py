"""The training pipeline: resolve the run spec -> load base -> apply strategy -> train -> evaluate -> save.

`adapters.runspec.resolve` checks everything a user can get wrong first; `train` then runs an
Accelerate loop (prepare, accumulate, backward, gather), so ``accelerate launch --multi_gpu -m
adapters train`` on GPUs, or ``torchrun --nproc_per_node N -m adapters train`` on the CPU, runs it
data-parallel unchanged: one process saves and reports.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import data as datasets
from .contract import declared_trainable
from .errors import AdaptersError, TrainingFailed
from .host import distribution_of
from .loading import BaseModel, load_base_model
from .nn import ParameterCount, count_parameters
from .runspec import Run, RunSpec, resolve
from .store import save


@dataclass
class TrainResult:
    strategy: str
    model: str
    quantization: str
    task: str
    steps: int
    parameters: ParameterCount
    before: dict[str, float]
    after: dict[str, float]
    losses: list[float]
    tokens_per_s: float
    seconds: float
    output: Path | None
    processes: int = 1  # data-parallel processes (torchrun or accelerate launch)
    main_process: bool = True  # False in the other processes of a data-parallel run

    def summary(self) -> dict[str, Any]:
        """What `adapters train --json` prints."""
        return {
            "strategy": self.strategy, "model": self.model, "quantization": self.quantization,
            "task": self.task, "steps": self.steps,
            "trainable_parameters": self.parameters.trainable, "total_parameters": self.parameters.total,
            "heldout_before": self.before, "heldout_after": self.after,
            "tokens_per_s": round(self.tokens_per_s, 1), "seconds": round(self.seconds, 2),
            "processes": self.processes, "output": str(self.output) if self.output else None,
        }


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


def make_accelerator(gradient_accumulation_steps: int = 1):
    """bf16 mixed precision on GPU, full precision on the CPU."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    return Accelerator(
        mixed_precision="bf16" if cuda else "no",
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=not cuda,  # without it, processes started by torchrun on a CPU machine would not join one group
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


def training_step(model, batch, optimizer, accelerator, step: int) -> torch.Tensor:
    """One micro-step: forward, backward, and an optimizer step when accumulation is complete."""
    with accelerator.accumulate(model):
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise TrainingFailed(
                f"loss became {loss.item()} at step {step}; stopped and saved nothing. "
                "Lower --learning-rate, or check the data."
            )
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train(spec: RunSpec, progress: bool = True) -> TrainResult:
    """Train a strategy on a base model and data, evaluate it before and after, and save it."""
    from tqdm.auto import tqdm

    run = resolve(spec)
    s = run.spec
    accelerator = make_accelerator(s.gradient_accumulation_steps)
    base, model, _ = build(run, accelerator.device)
    params = count_parameters(model)

    train_set = make_batches(run.dataset.train, base, s.seq_len, "train")
    eval_set = make_batches(run.dataset.heldout, base, s.seq_len, "held-out")
    generator = torch.Generator().manual_seed(s.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=s.batch_size, shuffle=True, generator=generator)
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=s.batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.learning_rate)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    before = evaluate(model, eval_loader, run.task, accelerator, s.eval_batches)
    model.train()
    losses: list[float] = []
    tokens = 0
    bar = tqdm(total=s.max_steps, desc=f"train {run.strategy.name}", unit="step",
               disable=not progress or not accelerator.is_local_main_process)
    start = time.perf_counter()
    batches = _forever(train_loader)
    try:
        for step in range(1, s.max_steps + 1):
            step_loss = 0.0
            for _ in range(s.gradient_accumulation_steps):
                batch = next(batches)
                loss = training_step(model, batch, optimizer, accelerator, step)
                step_loss += loss.item() / s.gradient_accumulation_steps
                tokens += _tokens(batch) * accelerator.num_processes
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):,.0f}")
            bar.update()
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    after = evaluate(model, eval_loader, run.task, accelerator, s.eval_batches)

    output = None
    if s.output:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            dist, version = distribution_of(run.plugin)
            output = save(
                accelerator.unwrap_model(model), s.output, strategy=run.strategy, config=run.config,
                base=base, overwrite=s.overwrite, plugin_versions={dist: version},
                training={**{k: v for k, v in asdict(s).items() if k not in ("output", "overwrite")},
                          "quantization": run.quantization, "task": run.task, "learning_rate": run.learning_rate},
            )
    return TrainResult(run.strategy.name, s.model, run.quantization, run.task, s.max_steps, params, before, after,
                       losses, tokens / seconds if seconds else 0.0, seconds, output,
                       accelerator.num_processes, accelerator.is_main_process)


def _forever(loader):
    while True:
        yield from loader
