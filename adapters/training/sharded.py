"""A sharded session's state (``--sharding fsdp``): gathered into the files one process writes.

FSDP2 (``torch.distributed.fsdp.fully_shard``) splits every parameter along its first dimension across the
processes, one unit per decoder layer (the model's ``_no_split_modules``) and the rest (embeddings, final norm,
head) in the root unit; each unit's whole weights exist only while it runs. Gradients and AdamW's states follow
the shards. Accelerate sets it up (`adapters.distributed.fsdp_plugin`); on the CPU too, over gloo.

What a sharded run writes is what one process writes, never a format of its own:

- the weights: the whole state dict, gathered into the main process (`whole_state`, a collective), loaded into the
  strategy applied afresh to a fresh base and saved as any run saves;
- a checkpoint's optimizer and schedule: AdamW's whole state, gathered the same way, as ``optimizer.safetensors``
  (tensors, by parameter name) and ``optimizer.json`` (the parameter groups and the schedule's state). A resumed
  run reads them in every process, and each keeps its own shard.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import checkpoints
from ..checkpoints import OPTIMIZER_STATE, OPTIMIZER_TENSORS, STATE_SEPARATOR
from ..errors import AdaptersError
from ..files import write_json
from ..loading import BaseModel
from ..runspec import Run
from ..tensorfiles import read_safetensors
from .model import apply_strategy, keep_float32_trainable, load_base, restore_dtypes
from .state import State



class ShardedState(State):
    """Weights, gradients and optimizer states spread over the processes: gathered to be checked or written."""

    def non_finite_weight(self) -> str | None:
        """Every process's shards checked, so that every process gives the same answer."""
        accelerator = self.session.accelerator
        named = [(name, p) for name, p in self.unwrapped().named_parameters() if p.requires_grad]
        local = [p.to_local() if hasattr(p, "to_local") else p for _, p in named]  # this process's shard (DTensor)
        finite = torch.stack([torch.isfinite(t).all().to(accelerator.device) for t in local]).int()
        finite = accelerator.reduce(finite, reduction="sum") == accelerator.num_processes
        return None if bool(finite.all()) else named[int((~finite).nonzero()[0])][0]

    def save_checkpoint(self, output: str, position: checkpoints.Position, settings: dict[str, Any],
                        keep: int | None) -> Path | None:
        session, accelerator = self.session, self.session.accelerator
        accelerator.wait_for_everyone()
        whole = whole_model(self.unwrapped(), session.run, accelerator.is_main_process)
        optimizer_state = _whole_optimizer_state(self.unwrapped(), session.optimizer.optimizer)
        written = None
        if whole is not None:
            model, base = whole
            written = checkpoints.write(
                output, position, settings, lambda d: self.save_weights(model, base, d),
                lambda d: _save_optimizer_state(d, optimizer_state, session.scheduler), keep)
        accelerator.wait_for_everyone()
        return written

    def load_checkpoint(self, checkpoint: Path) -> None:
        session = self.session
        _load_optimizer_state(checkpoint, self.unwrapped(), session.optimizer.optimizer, session.scheduler.scheduler)

    def whole(self) -> tuple[torch.nn.Module, BaseModel] | None:
        self.session.accelerator.wait_for_everyone()
        whole = whole_model(self.unwrapped(), self.session.run, self.session.accelerator.is_main_process)
        if whole is not None:
            restore_dtypes(whole[0], self.session.built.dtypes)
        return whole


def whole_model(model: torch.nn.Module, run: Run, main_process: bool) -> tuple[torch.nn.Module, BaseModel] | None:
    """A sharded ``model`` as one process's: its whole state dict gathered into the main process (every process
    calls this), loaded there into ``run``'s strategy applied afresh to a fresh base on the CPU, its trained weights
    float32 master weights as in training; that saves the same files as one process's run. None elsewhere."""
    state = whole_state(model)
    if not main_process:
        return None
    base = load_base(run, torch.device("cpu"))
    whole, _ = apply_strategy(run, base)
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


def _whole_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW's whole state for a sharded ``model``, by parameter name, in the main process. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def _save_optimizer_state(directory: Path, state: dict[str, Any], scheduler: Any) -> None:
    """Write `_whole_optimizer_state`'s ``state`` and the schedule's into ``directory``: tensors as safetensors, the
    rest as JSON."""
    from safetensors.torch import save_file

    tensors = {f"{name}{STATE_SEPARATOR}{key}": value.detach().cpu().contiguous()
               for name, values in state["state"].items() for key, value in values.items()
               if isinstance(value, torch.Tensor)}
    others = {name: {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
              for name, values in state["state"].items()}
    save_file(tensors, directory / OPTIMIZER_TENSORS)
    write_json(directory / OPTIMIZER_STATE, {"param_groups": state["param_groups"], "scalars": others,
                                             "scheduler": scheduler.state_dict()})


def _load_optimizer_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          scheduler: Any) -> None:
    """Put the state `_save_optimizer_state` wrote into a sharded run's ``optimizer`` (each process keeps its shard)
    and ``scheduler``. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    saved = json.loads((directory / OPTIMIZER_STATE).read_text())
    state: dict[str, dict[str, Any]] = {name: dict(values) for name, values in saved["scalars"].items()}
    for key, tensor in read_safetensors(directory / OPTIMIZER_TENSORS).items():
        name, _, what = key.rpartition(STATE_SEPARATOR)
        state.setdefault(name, {})[what] = tensor
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": saved["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
