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
from typing import Any

import torch

from .files import write_json

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
    """Whether FSDP sharded ``model`` (or a module in it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


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
