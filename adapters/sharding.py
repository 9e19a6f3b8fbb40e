"""Sharded training (``--sharding fsdp``): FSDP2 through Accelerate, and the states of a sharded run gathered
into the files one process writes.

FSDP2 (``torch.distributed.fsdp.fully_shard``) splits every parameter along its first dimension across the
processes, one unit per decoder layer (the model's ``_no_split_modules``) and the rest (embeddings, final norm,
head) in the root unit; each unit's whole weights exist only while it runs. Gradients and AdamW's states follow
the shards. Accelerate sets it up (`fsdp_plugin`); on the CPU too, over gloo, which is how the tests run it.

What a sharded run writes is what one process writes, never a format of its own:

- the weights: the whole state dict, gathered into the main process (`whole_state`, a collective), which the
  trainer loads into the strategy applied afresh to a fresh base and saves as any run does;
- a checkpoint's optimizer and schedule: AdamW's whole state, gathered the same way (`whole_optimizer_state`),
  as ``optimizer.safetensors`` (tensors, by parameter name) and ``optimizer.json`` (the parameter groups and
  the schedule's state). A resumed run reads them in every process (`load_optimizer_state`), and each keeps
  its own shard.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .files import write_json

if TYPE_CHECKING:
    from .loading import BaseModel
    from .runspec import Run

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"
_SEPARATOR = "::"  # between a parameter's name and the name of one of its states: "model.norm.weight::exp_avg"


def fsdp_plugin():
    """FSDP2, one unit per decoder layer (the model's ``_no_split_modules``), resharded after each forward."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True, cpu_ram_efficient_loading=False)


def launched_with_fsdp() -> bool:
    """Whether ``accelerate launch --use_fsdp`` (or an ``accelerate config`` with FSDP) started this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is one Accelerate sharded: it shards the model it prepares last, as the root unit, so the
    model itself says it (no walk through its modules, which the loss asks on every step)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def whole_model(model: torch.nn.Module, run: Run, main_process: bool) -> tuple[torch.nn.Module, BaseModel] | None:
    """A sharded ``model`` as one process's: its whole state dict gathered into the main process (every process
    calls this), loaded there into ``run``'s strategy applied afresh to a fresh base on the CPU, its trained weights
    float32 master weights as in training; that saves the same files as one process's run. None elsewhere."""
    from .errors import AdaptersError
    from .training import apply_strategy, keep_float32_trainable, load_base

    state = whole_state(model)
    if not main_process:
        return None
    base = load_base(run, torch.device("cpu"))
    whole, _, _ = apply_strategy(run, base)
    keep_float32_trainable(whole)
    missing, unexpected = whole.load_state_dict(state, strict=False)
    trained = {n for n, p in whole.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        raise AdaptersError(f"the gathered weights do not fit the model: unexpected {unexpected[:3]}, missing "
                            f"{sorted(trained & set(missing))[:3]}")
    return whole, base


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded ``model``, on the CPU, in the main process (empty elsewhere). Every
    process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def whole_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW's whole state for a sharded ``model``, by parameter name, in the main process. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def save_optimizer_state(directory: Path, state: dict[str, Any], scheduler: Any) -> None:
    """Write `whole_optimizer_state`'s ``state`` and the schedule's into ``directory``: tensors as safetensors,
    the rest as JSON."""
    from safetensors.torch import save_file

    tensors = {f"{name}{_SEPARATOR}{key}": value.detach().cpu().contiguous()
               for name, values in state["state"].items() for key, value in values.items()
               if isinstance(value, torch.Tensor)}
    others = {name: {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
              for name, values in state["state"].items()}
    save_file(tensors, directory / OPTIMIZER_TENSORS)
    write_json(directory / OPTIMIZER_STATE, {"param_groups": state["param_groups"], "scalars": others,
                                             "scheduler": scheduler.state_dict()})


def load_optimizer_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         scheduler: Any) -> None:
    """Put the state `save_optimizer_state` wrote into a sharded run's ``optimizer`` (each process keeps its shard)
    and ``scheduler``. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from .store import read_safetensors

    saved = json.loads((directory / OPTIMIZER_STATE).read_text())
    state: dict[str, dict[str, Any]] = {name: dict(values) for name, values in saved["scalars"].items()}
    for key, tensor in read_safetensors(directory / OPTIMIZER_TENSORS).items():
        name, _, what = key.rpartition(_SEPARATOR)
        state.setdefault(name, {})[what] = tensor
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": saved["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
