"""How the training step runs on its device: the optimizer, and compiling the decoder.

`make_optimizer` builds AdamW in its fastest form for the device: fused (one kernel for every tensor, no host
synchronisation, no temporaries the size of the weights) where torch has a fused kernel for it, which it has on
CUDA and, since torch 2.4, on the CPU; foreach (one launch per group of tensors) anywhere else.

No host synchronisation in a step: the training loop (`adapters.training.loop`) keeps losses, token counts and the
gradient norm on the device and reads them at its logging interval only; clipping (torch's ``clip_grad_norm_``
through Accelerate) and the fused AdamW read nothing back either. One read remains that is not ours: transformers'
forward looks at the batch once (``masking_utils``: whether rows are packed, or padded) to choose its attention
kernel.
tests/test_engine.py counts the host reads of real steps on the CPU, and, on a GPU, runs a step under
``torch.cuda.set_sync_debug_mode``.

`compile_layers` compiles the decoder's repeated layers one by one, in place (``layer.compile()``): regional
compilation, as torchtune and transformers recommend. Every layer has the same code, so torch compiles it once
and reuses it for the others, which keeps compile time at about one layer's. The layers are found whatever
wraps them (PEFT, a strategy's own modules): the longest `torch.nn.ModuleList` of modules of one class.
Compiling is lazy: a compiler that fails (no C++ compiler for the CPU, an operation inductor does not support)
fails at the first step, where `is_compile_error` tells it from other errors and `uncompile_layers` undoes it, so
that the run goes on uncompiled with a one-line `CompileFallback` warning rather than dying.

Whether compile is on, whether gated MLPs recompute, and which AdamW runs are `adapters.rules`' to say; this
module carries them out.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from collections.abc import Iterable, Iterator

import torch

from . import rules

# What `compile_layers` compiles with; a test swaps in a backend that fails.
BACKEND = "inductor"


class CompileFallback(UserWarning):
    """Compiling the decoder layers failed, and the run goes on without compiling them."""


def make_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float, weight_decay: float = 0.0,
                   device: torch.device | str | None = None, kind: str | None = None) -> torch.optim.Optimizer:
    """The optimizer ``kind`` (`rules.OPTIMIZERS`; default AdamW) over ``params`` for ``device`` (default: where the
    first parameter is), in the form `rules.optimizer` gives: AdamW fused or foreach (neither synchronises with
    the host in ``step``), or bitsandbytes' 8-bit AdamW, paged or not.

    ``params`` may be parameter groups (dicts with "params" and, each its own, "lr" or "weight_decay"), as
    torch's optimizers take them; ``lr`` and ``weight_decay`` are the defaults of groups that do not set them."""
    params = list(params)
    first = next((p for item in params for p in (item["params"] if isinstance(item, dict) else [item])), None)
    device = torch.device(device) if device is not None else (first.device if first is not None
                                                              else torch.device("cpu"))
    form = rules.optimizer(device.type, kind)
    if form in rules.EIGHT_BIT_OPTIMIZERS:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if form == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay)
    if form == "adamw-fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The decoder's repeated blocks: the longest ModuleList (of two or more) whose modules are all one class; None
    when the model has none."""
    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and \
                len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
            best = module
    return best


def compile_layers(model: torch.nn.Module) -> int:
    """Compile each of ``model``'s decoder layers in place (`decoder_layers`); the number compiled (0: none found).

    Names and weights stay as they were, so saving, loading and checkpoints see the same model."""
    layers = decoder_layers(model)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile(backend=BACKEND)
    return len(layers)


def uncompile_layers(model: torch.nn.Module) -> None:
    """Undo `compile_layers`: every module runs eagerly again."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Within the block, compiled layers run eagerly and nothing compiles (torch 2.6+; before, as they are)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    with set_stance("force_eager") if set_stance is not None else contextlib.nullcontext():
        yield


def is_compile_error(exc: BaseException) -> bool:
    """An error of torch.compile itself (dynamo, the backend compiler, inductor), not of the model or the data."""
    kinds = [getattr(sys.modules.get(module), name, None) for module, name in
             (("torch._dynamo.exc", "TorchDynamoException"), ("torch._inductor.exc", "InductorError"))]
    return isinstance(exc, tuple(k for k in kinds if isinstance(k, type)))


def fall_back(model: torch.nn.Module, exc: BaseException) -> str:
    """After a compile error: run ``model`` uncompiled from now on, with a one-line warning; the reason, one line."""
    uncompile_layers(model)
    torch._dynamo.reset()  # and drop what the failed compile left behind
    exc = getattr(exc, "inner_exception", None) or exc  # what the backend compiler raised
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    warnings.warn(f"--compile failed ({type(exc).__name__}: {reason}); going on without compiling. Pass "
                  "--no-compile to skip it.", CompileFallback, stacklevel=2)
    return f"{type(exc).__name__}: {reason}"


# ------------------------------------------------------------------------------------------------
# Gated MLPs that recompute their elementwise ops in backward

# The forward of Llama's MLP and of the families that copy it (Mistral, Qwen2/3, Gemma 1/2, Granite, OLMo, Cohere).
_GATED_MLP = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


def recompute_gated_mlps(model: torch.nn.Module) -> int:
    """Make each gated MLP (``down(act(gate(x)) * up(x))``) keep only ``gate(x)`` and ``up(x)`` for backward, and
    recompute ``act(gate) * up`` there: the activation's output is not kept, one ``[tokens x intermediate]`` tensor
    a layer (0.35 GiB of SmolLM2's 30 layers at 4 x 512 in fp32), for an elementwise op's compute. The values and
    gradients are the same. An MLP whose forward is anything else is left alone. Returns how many were changed."""
    count = 0
    for module in model.modules():
        kind = type(module)
        if getattr(module, "_adapters_recomputes", False) or not all(
                hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        try:
            source = inspect.getsource(kind.forward)
        except (OSError, TypeError):
            continue
        if _GATED_MLP in source and source.count("return") == 1:
            module.forward = _gated_mlp_forward.__get__(module)
            module._adapters_recomputes = True
            count += 1
    return count


def _activated(act: torch.nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


def _gated_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        hidden = torch.utils.checkpoint.checkpoint(_activated, self.act_fn, gate, up, use_reentrant=False)
    else:
        hidden = _activated(self.act_fn, gate, up)
    return self.down_proj(hidden)
