"""The model a session trains: the base loaded for training, the strategy applied (or restored from saved
weights), and the precision it trains in.

Precision: on a GPU the base is loaded in bf16 and computes under bf16 autocast, but the weights a
strategy trains are kept in float32 (`keep_float32_trainable`): master weights, so that updates smaller
than bf16's resolution (about 1/128 of a weight's size; a learning rate of 1e-5 gives far smaller ones)
accumulate instead of rounding away. This is the usual mixed-precision recipe, rather than pure bf16
training. It costs memory where a strategy trains weights of the base itself (full fine-tuning, a
probe's head, norms): 4 bytes a weight instead of 2, and the same again for their gradients and for
each of AdamW's two moments, which follow the weights' dtype. LoRA's adapter weights are float32
already (PEFT keeps them so), so nothing changes for them. A completed run rounds the master weights
back to the dtype the strategy gave them (`restore_dtypes`) before its final evaluation and save, so
the result is what ``adapters.load`` gives back; checkpoints keep them in float32, so a resumed run
continues from them exactly. On the CPU the base is float32 and nothing changes, unless ``--mixed-precision bf16``
asks for the GPU's recipe there (`adapters.rules.autocasts`): worth it on CPUs with native bf16 instructions.

``--master-weights none`` trains in bf16 throughout instead (`adapters.rules.base_dtype` and `weights_dtype`):
the base loads in bf16 on every device, and what trains is kept in bf16 (`keep_trainable`), its gradients and
AdamW's moments with it: half the bytes of each, for updates that round at bf16's resolution.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import engine, rules
from ..checkpoints import MODEL
from ..contract import InitialisesFromData, SavesOwnFormat, declared_trainable
from ..errors import AdaptersError
from ..loading import BaseModel, load_base_model
from ..manifest import read_manifest
from ..nn import count_parameters
from ..runspec import Run, run_shape
from ..store import check_base, load_trainable, restore


@dataclass
class Built:
    """The base, the model to train on it, and how it was made."""

    base: BaseModel
    model: torch.nn.Module
    dtypes: dict[str, torch.dtype]  # the strategy's dtype of each weight that trains as a float32 master weight
    declared: int | None  # the trainable count the strategy declared for this base (None: it declares none)
    load_s: float  # seconds to load the base and apply the strategy
    base_dtype: str  # the frozen weights' dtype, as loaded
    other_base: dict[str, str] | None = None  # restored onto other weights (--allow-other-base)

    def precision(self, autocast: str | None) -> dict[str, Any]:
        """The dtypes it trains in, as results and manifests record them."""
        return {"base_dtype": self.base_dtype,
                "trainable_dtype": trainable_dtypes(self.model),
                "master_weights": sorted({str(d).removeprefix("torch.") for d in self.dtypes.values()}),
                "autocast": autocast}


# The training batches of a run's base (its tokenizer), for a strategy that initialises from data.
TrainBatches = Callable[[BaseModel], Iterable[dict[str, torch.Tensor]]]


def build(run: Run, device: torch.device, *, checkpoint: Path | None = None, saved: Path | None = None,
          data: TrainBatches | None = None) -> Built:
    """Load ``run``'s base on ``device`` and put its strategy on it: freshly applied (from the first batches of
    ``data`` where the strategy initialises from data, `adapters.InitialisesFromData`); or restored from a
    checkpoint's weights (``checkpoint``), or from the final save in ``saved`` (a run continued with a fresh
    optimizer)."""
    started = time.perf_counter()
    base = load_base(run, device)
    base_dtype = str(base.model.dtype).removeprefix("torch.")  # before a strategy makes master weights of some
    if checkpoint is None and saved is None:
        declared = declared_trainable(run.strategy, base.model, run.config)
        model, dtypes = apply_strategy(run, base, data)
        return Built(base, model, dtypes, declared, time.perf_counter() - started, base_dtype)
    directory = saved if saved is not None else checkpoint / MODEL
    other_base = check_base(directory, read_manifest(directory), base, run.spec.allow_other_base)
    model = restore(run.strategy, base.model, directory, run.config)
    dtypes = keep_trainable(model, rules.weights_dtype(torch.device(device).type, run.spec.master_weights,
                                                       run.spec.mixed_precision))
    if count_parameters(model).trainable == 0:  # e.g. PEFT's prefix with projection, saved for inference
        raise AdaptersError(f"{directory}: strategy {run.strategy.name!r} restores these weights for inference only "
                            "(nothing is trainable once loaded), so they cannot be trained further. Start a new run "
                            "instead of --resume.")
    if checkpoint is not None and dtypes and not isinstance(run.strategy, SavesOwnFormat):
        # The checkpoint holds the float32 master weights; restoring went through the strategy's dtype.
        load_trainable(model, directory)
    return Built(base, model, dtypes, None, time.perf_counter() - started, base_dtype, other_base)


def load_base(run: Run, device: torch.device) -> BaseModel:
    """The base for ``run``, loaded under its seed and set up for training, before any strategy touches it."""
    from accelerate.utils import set_seed

    s = run.spec
    set_seed(s.seed)
    labels = run.dataset.labels if run.dataset is not None else None
    dtype = getattr(torch, rules.base_dtype(torch.device(device).type, s.master_weights, s.mixed_precision))
    base = load_base_model(s.model, run.quantization, run.task, labels or None, device, dtype=dtype)
    # Training never decodes: without this, every forward also fills a key/value cache that holds
    # each layer's keys and values (all of them when nothing else keeps them: a probe, a padded batch).
    base.model.config.use_cache = False
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(base.model, s.checkpoint_layers)
    if run_shape(s, run.task, run.quantization, torch.device(device).type).recomputes_mlp:
        engine.recompute_gated_mlps(base.model)
    return base


def apply_strategy(run: Run, base: BaseModel, data: TrainBatches | None = None
                   ) -> tuple[torch.nn.Module, dict[str, torch.dtype]]:
    """Apply ``run``'s strategy to ``base`` and keep what it trains in its dtype (`keep_trainable`). A strategy that
    initialises from data gets the first batches of ``data`` (`adapters.InitialisesFromData`); without ``data`` it
    is refused.

    Returns the model and the dtypes the strategy gave the weights that became float32 (`keep_float32_trainable`).
    """
    strategy, config = run.strategy, run.config
    wanted = strategy.data_batches(config) if isinstance(strategy, InitialisesFromData) else 0
    if wanted and data is None:
        raise AdaptersError(f"strategy {strategy.name!r} initialises from the run's training data with these "
                            "options, and this run has none here. Train it with adapters train, or choose an "
                            "initialisation that needs no data.")
    if wanted:
        device = next(base.model.parameters()).device
        batches = [{k: v.to(device) for k, v in batch.items()} for batch in itertools.islice(data(base), wanted)]
        model = strategy.apply_with_data(base.model, config, batches)
    else:
        model = strategy.apply(base.model, config)
    if count_parameters(model).trainable == 0:
        raise AdaptersError(f"strategy {run.strategy.name!r}: apply left no parameter trainable; check its options.")
    return model, keep_trainable(model, rules.weights_dtype(base.model.device.type, run.spec.master_weights,
                                                            run.spec.mixed_precision))


def enable_gradient_checkpointing(model: torch.nn.Module, layers: int | None = None) -> None:
    """Turn checkpointing on so that it really engages with a frozen base: for every decoder layer, or for the first
    ``layers`` of them (the others keep their activations; see `adapters.plan.memory` for why the first).

    Non-reentrant checkpointing plus input gradients lets gradients flow through checkpointed
    segments whose own weights are all frozen; the session keeps the model in train mode, without
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
    if layers is not None:
        _checkpoint_first(model, layers)


def _checkpoint_first(model: torch.nn.Module, layers: int) -> None:
    """Leave checkpointing on for the first ``layers`` decoder layers alone."""
    decoder = engine.decoder_layers(model)
    if decoder is None or not all(hasattr(layer, "gradient_checkpointing") for layer in decoder):
        raise AdaptersError(f"--checkpoint-layers: {type(model).__name__} checkpoints as a whole, not layer by "
                            "layer. Use --gradient-checkpointing alone.")
    for index, layer in enumerate(decoder):
        layer.gradient_checkpointing = index < layers


def keep_trainable(model: torch.nn.Module, dtype: str) -> dict[str, torch.dtype]:
    """What trains kept in ``dtype`` (`adapters.rules.weights_dtype`): "float32", as master weights
    (`keep_float32_trainable`, whose dtypes it returns); else in that dtype, the base's (nothing to restore: {})."""
    if dtype == "float32":
        return keep_float32_trainable(model)
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point():
            p.data = p.data.to(getattr(torch, dtype))
    return {}


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
