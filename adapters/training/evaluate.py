"""Held-out evaluation of a model in training: loss and perplexity, or loss and accuracy."""
from __future__ import annotations

import math

import torch

from .. import loss as losses
from ..rules import IGNORE_INDEX


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
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()
    return torch.tensor(float(batch["input_ids"].shape[0]))
