"""What a run of several processes is, asked without touching its state: a leaf every layer may import.

`is_sharded` is asked on every step (the loss, the training state); `launched_processes` and `launched_with_fsdp`
read what the launcher (torchrun, ``accelerate launch``) told this process; `fsdp_plugin` is the FSDP2 set-up that
``--sharding fsdp`` asks Accelerate for. Gathering and writing a sharded run's state is the training session's
(`adapters.training.sharded`).
"""
from __future__ import annotations

import os

import torch


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is one Accelerate sharded: it shards the model it prepares last, as the root unit, so the
    model itself says it (no walk through its modules, which the loss asks on every step)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def launched_with_fsdp() -> bool:
    """Whether ``accelerate launch --use_fsdp`` (or an ``accelerate config`` with FSDP) started this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def launched_processes() -> int:
    """How many processes the launcher (torchrun, ``accelerate launch``) started for this run; 1 without one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def fsdp_plugin():
    """FSDP2, one unit per decoder layer (the model's ``_no_split_modules``), resharded after each forward."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True, cpu_ram_efficient_loading=False)
