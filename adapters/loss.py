"""The causal-LM loss without the whole batch's ``[tokens x vocab]`` logits.

`loss` runs the model with its output head set aside, so that the forward ends at the final hidden
states (``[tokens x hidden]``), then computes the cross-entropy in chunks of ``chunk`` tokens through
the model's own head module. Each chunk's logits, their fp32 copy and log-softmax live only while that
chunk runs: the chunk runs under non-reentrant `torch.utils.checkpoint`, which keeps nothing but its
slice of the hidden states and recomputes the logits in backward. The loss equals transformers'
``labels=`` loss (the labels shifted by one, -100 ignored, the mean over the labelled tokens), and
so do the gradients, to float rounding (tests/test_loss.py).

It works whatever a strategy did to the model, since it calls the same modules the model does:

- PEFT wrappers are looked through to the transformers model (`output_head`); a LoRA on the head, a
  probe's new head and tied embeddings are the head module itself, so they get their gradients;
- prefix tuning adds keys and values only: the hidden states line up with ``input_ids``; prompt
  tuning's virtual tokens come first, and are dropped, as PEFT's own labels drop them;
- labels of -100 (instruction data's prompts, padding) and packed rows are as in the model's loss.

A model whose forward changes the head's output (Gemma 2 and 3 soft-cap it, Cohere and Granite scale
it) gets the same change in each chunk (`_post_processing`). That is checked against what the forward
really does on the first step of each model (`_Target.verify`): a model that does anything else, calls
its head other than once, or has a loss of its own, gets its own ``labels=`` loss (the path
"model"), as does sequence classification, and ``chunk=0``.

On CUDA, with `liger-kernel` installed (the ``liger`` extra), a plain ``nn.Linear`` head goes through
Liger's fused linear cross-entropy instead ("liger"), which computes the gradients chunk by chunk in its
forward, so nothing is recomputed.

Nothing here reads a value back to the host, so the step stays free of synchronisation; the one
exception is the check of a post-processing, once, on a model's first step.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from . import rules
from .distributed import is_sharded
from .rules import IGNORE_INDEX

_CAUSAL_LM_LOSS = "ForCausalLM"  # the loss_type whose loss this module reproduces


def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int | None = None) -> torch.Tensor:
    """The training loss of ``batch`` (with its ``labels``): for a causal LM, computed in chunks of
    ``chunk`` tokens (None: `adapters.rules.DEFAULT_LOSS_CHUNK`; 0: the model's own ``labels=`` loss); otherwise
    the model's own. A scalar on the model's device, never read back to the host."""
    chunk = rules.loss_chunk(chunk)
    if chunk < 0:
        raise ValueError(f"chunk must be at least 0, not {chunk}")
    labels = batch.get("labels")
    target = _Target.of(model) if chunk and labels is not None and labels.dim() == 2 else None
    if target is None:
        return model(**batch).loss
    if is_sharded(model):
        return target.within_forward(transformers_model(model), model, batch, chunk)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with target.captured() as capture:
        out = model(**inputs)
    hidden = capture.hidden if len(capture.hiddens) == 1 else None
    logits = getattr(out, "logits", None)  # the placeholder, or what the forward made of it
    if hidden is None or hidden.shape[1] < labels.shape[1] or not target.verify(logits, capture.placeholder):
        target.give_up()  # this model's forward does what the chunks do not: its own loss, from now on
        del out, capture, hidden, logits
        return model(**batch).loss
    # Prompt tuning puts its virtual tokens first; PEFT gives them labels of -100, so they are dropped.
    hidden = hidden[:, hidden.shape[1] - labels.shape[1]:]
    return target.cross_entropy(hidden, labels.to(hidden.device), chunk)


def loss_path(model: torch.nn.Module, chunk: int | None = None, device: torch.device | str | None = None) -> str:
    """How `loss` computes ``model``'s causal-LM loss: ``"chunked(N)"``, ``"liger"`` or ``"model"``
    (after the first step: a model found to need its own loss says so). `adapters.rules.loss_path` is what it is
    before the model is seen; this is what it became."""
    chunk = rules.loss_chunk(chunk)
    target = _Target.of(model) if chunk else None
    if target is None:
        return "model"
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return "liger" if target.liger_applies(device) else f"chunked({chunk})"


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside ``model``: through DDP, ``torch.compile`` and PEFT wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # PeftModel
            inner = model.get_base_model()
            if inner is model:
                return model
            model = inner
        else:
            return model


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module ``model``'s forward turns hidden states into logits with, as the strategy left it
    (a PEFT LoRA layer, a probe's new head); None when it has none (sequence classification)."""
    inner = transformers_model(model)
    get = getattr(inner, "get_output_embeddings", None)
    return get() if callable(get) else None


# ------------------------------------------------------------------------------------------------
# The model's head, set aside during the forward and called per chunk


class _Capture(torch.nn.Module):
    """Stands in for the head during the forward: keeps its input (the final hidden states) and returns
    a ``[batch x positions x 1]`` placeholder, so whatever the forward does to the logits costs nothing."""

    def __init__(self, fill: float) -> None:
        super().__init__()
        self.fill = fill
        self.hiddens: list[torch.Tensor] = []
        self.placeholder: torch.Tensor | None = None

    @property
    def hidden(self) -> torch.Tensor:
        return self.hiddens[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hiddens.append(hidden)
        self.placeholder = torch.full((*hidden.shape[:-1], 1), self.fill, dtype=hidden.dtype, device=hidden.device)
        return self.placeholder


_PLACEHOLDER = 8.0  # a value each post-processing changes by more than `verify` allows: a softcap of 30 gives 7.82


class _Target:
    """One transformers model's head: where it sits, what the forward does to its output, and whether
    that has been checked. Kept per model (`of`) while the model lives."""

    _known: weakref.WeakKeyDictionary[torch.nn.Module, _Target] = weakref.WeakKeyDictionary()

    def __init__(self, inner: torch.nn.Module, head: torch.nn.Module) -> None:
        self.head = head
        name = next((n for n, m in inner.named_modules() if m is head), None)
        parent_name, _, self.attribute = (name or "").rpartition(".")
        self.parent = inner.get_submodule(parent_name)
        self.kind, self.value = _post_processing(inner)
        self.post = _post_function(self.kind, self.value)
        self.verified = False
        # The model's own loss must be transformers' causal-LM one (a loss_type of None falls back to it).
        self.usable = bool(name) and self.kind is not None and not hasattr(inner, "_loss_function") \
            and getattr(inner, "loss_type", None) in (None, _CAUSAL_LM_LOSS)

    @classmethod
    def of(cls, model: torch.nn.Module) -> _Target | None:
        """The target for ``model``'s head; None when the model's own loss must be used."""
        inner = transformers_model(model)
        head = output_head(model)
        if head is None:
            return None
        target = cls._known.get(inner)
        if target is None or target.head is not head:  # new, or a strategy replaced the head since
            target = cls._known[inner] = cls(inner, head)
        return target if target.usable else None

    @contextlib.contextmanager
    def captured(self) -> Iterator[_Capture]:
        """The head set aside for a `_Capture`, and always put back."""
        capture = _Capture(_PLACEHOLDER)
        setattr(self.parent, self.attribute, capture)
        try:
            yield capture
        finally:
            setattr(self.parent, self.attribute, self.head)

    def verify(self, logits: torch.Tensor | None, placeholder: torch.Tensor) -> bool:
        """Whether the forward did to the head's output exactly what the chunks do. The placeholder itself back
        needs no look at values. Anything else is compared once per model (a host read, on the first step): a
        post-processing, or the placeholder in float32, which is what a model prepared by Accelerate for mixed
        precision returns (its ``convert_outputs_to_fp32``: missing it sent every bf16 model on a GPU to its
        own loss, the whole batch's logits in float32)."""
        if logits is placeholder:
            return self.kind == "none"
        if not self.verified and logits is not None:
            with torch.no_grad():
                expected = self.post(placeholder.float()) if self.post is not None else placeholder.float()
                self.verified = logits.shape == expected.shape and bool(
                    torch.allclose(logits.float(), expected, rtol=1e-2, atol=1e-2))
        return self.verified

    def within_forward(self, inner: torch.nn.Module, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                       chunk: int) -> torch.Tensor:
        """The chunks computed inside the model's forward, as its ``labels=`` loss: what a sharded model needs.

        FSDP gathers a unit's whole weights for its forward and frees them after it; it gathers them again for
        backward when the gradient reaches the unit's outputs. The head is the root unit's, so the chunks must
        run inside the root's forward and their loss be one of its outputs: the model's own loss function is
        stood in for (``_loss_function``, which transformers' models call with the logits, here the placeholder
        the forward made of them). A forward that does more to the logits than the chunks do gets its whole
        logits made from the hidden states once, and its own loss from then on."""
        with self.captured() as capture:
            def chunked(logits: torch.Tensor, labels: torch.Tensor, **_: Any) -> torch.Tensor:
                hidden = capture.hidden if len(capture.hiddens) == 1 else None
                if hidden is None:
                    raise RuntimeError("the model's forward called its output head other than once")
                if hidden.shape[1] < labels.shape[1] or not self.verify(logits, capture.placeholder):
                    self.give_up()  # the whole logits once, through the head and what the forward does after it
                    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1).to(hidden.device)
                    total = _chunk_loss(self.head, self.post, hidden.reshape(-1, hidden.shape[-1]), targets)
                    return total / (targets != IGNORE_INDEX).sum()
                hidden = hidden[:, hidden.shape[1] - labels.shape[1]:]
                return self.cross_entropy(hidden, labels.to(hidden.device), chunk)

            inner._loss_function = chunked
            try:
                return model(**batch).loss
            finally:
                del inner._loss_function

    def give_up(self) -> None:
        self.usable = False

    def liger_applies(self, device: torch.device) -> bool:
        return device.type == "cuda" and type(self.head) is torch.nn.Linear and self.kind in ("none", "softcap") \
            and _liger() is not None

    def cross_entropy(self, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        """The mean cross-entropy of ``hidden`` ``[batch x seq x hidden]`` predicting ``labels`` shifted by one."""
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # as transformers shifts them
        flat = hidden.reshape(-1, hidden.shape[-1])  # a view: no copy of the hidden states
        count = (targets != IGNORE_INDEX).sum()
        if self.liger_applies(flat.device):
            return self._liger(flat, targets) / count
        head = self.head
        if (type(head) is torch.nn.Linear and self.kind == "none" and torch.is_grad_enabled()
                and (head.weight.dtype == flat.dtype or _autocast_dtype(flat.device) is not None)):
            return _LinearCrossEntropy.apply(flat, head.weight, head.bias, targets, chunk) / count
        pieces = zip(flat.split(chunk), targets.split(chunk))  # one split: backward joins the gradients once
        run = functools.partial(_chunk_loss, self.head, self.post)
        if torch.is_grad_enabled():
            total = sum(torch.utils.checkpoint.checkpoint(run, h, t, use_reentrant=False) for h, t in pieces)
        else:
            total = sum(run(h, t) for h, t in pieces)
        return total / count

    def _liger(self, flat: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight, bias = self.head.weight, self.head.bias
        if weight.dtype != flat.dtype:  # a trained head's fp32 master weight under bf16 autocast
            weight = weight.to(flat.dtype)
            bias = bias.to(flat.dtype) if bias is not None else None
        softcap = self.value if self.kind == "softcap" else None
        out = _liger()(flat, weight, targets, bias, ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap)
        return (out[0] if isinstance(out, tuple) else out).float()


class _LinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, a chunk of rows at a time,
    for a plain linear head whose output the model does not change.

    Neither direction holds more than one chunk's logits. Forward keeps only its inputs. Backward makes each
    chunk's logits again, turns them in place into their gradient (the softmax less the one-hot target, zero
    on ignored rows) and adds the chunk's share into one gradient of the weight. Checkpointed chunks through
    the head module would hold the weight's gradient two or three times over while autograd sums the chunks'
    shares: what a trained head (full fine-tuning, a probe) costs most there.

    Under autocast both directions multiply in autocast's dtype, as the head module would in forward (a
    custom function's backward runs outside autocast, so it is said here): a trained head's float32 master
    weight is cast once a direction, and its gradient is still summed in float32, a chunk's share at a time.
    Without it, full fine-tuning's head ran its backward in float32, 2.8x slower on an H200.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.dtype = chunk, _autocast_dtype(hidden.device)
        w, b = _cast(weight, ctx.dtype), _cast(bias, ctx.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for h, t in zip(hidden.split(chunk), targets.split(chunk)):
                logits = F.linear(h.to(w.dtype), w, b).float()
                total += F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum")
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        w, b = _cast(weight, ctx.dtype), _cast(bias, ctx.dtype)
        start = 0
        with torch.autocast(hidden.device.type, enabled=False):
            for h, t in zip(hidden.split(ctx.chunk), targets.split(ctx.chunk)):
                h = h.to(w.dtype)
                grad = F.linear(h, w, b).float()
                grad.sub_(grad.logsumexp(-1, keepdim=True)).exp_()  # the softmax, in place
                rows = torch.arange(len(t), device=t.device)
                grad.index_put_((rows, t.clamp(min=0)), torch.tensor(-1.0, device=grad.device), accumulate=True)
                grad.mul_(((t != IGNORE_INDEX).float() * grad_total).unsqueeze(1))
                g = grad.to(w.dtype)
                del grad
                if grad_hidden is not None:
                    grad_hidden[start:start + len(t)] = g @ w
                if grad_weight is not None:
                    if grad_weight.dtype == g.dtype:
                        grad_weight.addmm_(g.t(), h)
                    else:  # a float32 master weight: the chunk's share in autocast's dtype, summed in float32
                        grad_weight += g.t() @ h
                if grad_bias is not None:
                    grad_bias += g.sum(0)
                start += len(t)
        return grad_hidden, grad_weight, grad_bias, None, None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes linear layers in on ``device`` now; None when it is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return tensor.to(dtype) if tensor is not None and dtype is not None else tensor


def _chunk_loss(head: torch.nn.Module, post: Callable[[torch.Tensor], torch.Tensor] | None,
                hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of one chunk: its logits ``[chunk x vocab]`` in fp32, as transformers upcasts them."""
    logits = head(hidden)
    if post is not None:  # as the model's forward applies it, before the loss upcasts
        logits = post(logits)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _post_processing(inner: torch.nn.Module) -> tuple[str | None, float | None]:
    """What the forward of ``inner`` does to its head's output, from its config: ("none", None),
    ("softcap", cap), ("scale", factor), ("divide", by); (None, None) for a change the chunks do not make."""
    config = inner.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(inner, "logit_scale", None)  # Cohere keeps config.logit_scale on the model
    divide = getattr(text, "logits_scaling", None)  # Granite
    found = [(kind, v) for kind, v in (("softcap", cap), ("scale", scale), ("divide", divide))
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(found) > 1 or getattr(text, "unpadded_vocab_size", None) or hasattr(inner, "final_logits_bias"):
        return None, None
    return found[0] if found else ("none", None)


def _post_function(kind: str | None, value: float | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if kind == "softcap":
        return lambda logits: torch.tanh(logits / value) * value
    if kind == "scale":
        return lambda logits: logits * value
    if kind == "divide":
        return lambda logits: logits / value
    return None


@functools.cache
def _liger() -> Any:
    """Liger's fused linear cross-entropy, or None when liger-kernel is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy
