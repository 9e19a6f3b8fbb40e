"""The optimizer in backward (``--optimizer-in-backward``): each trainable weight is stepped as soon as its gradient
is whole, and the gradient freed, so the whole model's gradients never exist at once.

As torchtune does it: one optimizer per weight (`adapters.engine.make_optimizer` over that weight alone, in the
form the rules give the device), stepped from the weight's ``register_post_accumulate_grad_hook``, which autograd
calls once the gradient has every contribution (a tied weight's included). Each weight's update is the plain
step's: AdamW updates every tensor on its own, and nothing here needs another weight's gradient, which is why
`adapters.rules.in_backward_refusal` refuses what would (clipping to the total norm, accumulation, several
processes).

`InBackward` is the one optimizer the session sees: the learning-rate schedule sets the learning rates of its
parameter groups (those of the per-weight optimizers, the same dicts), ``step`` and ``zero_grad`` have nothing
left to do after backward, and its state dict is that of one optimizer over every weight (a state and a parameter
group per weight, in order). A checkpoint holds it as a sharded run's holds AdamW's (`save`, `load`): the tensors in
``optimizer.safetensors`` by weight name, the rest in ``optimizer.json``; Accelerate, which would pickle it, never
sees it.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .. import engine
from ..checkpoints import OPTIMIZER_STATE, OPTIMIZER_TENSORS, STATE_SEPARATOR
from ..files import write_json
from ..tensorfiles import read_safetensors


class InBackward(torch.optim.Optimizer):
    """One optimizer per trainable weight, each stepped in backward (see the module's docstring)."""

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float, weight_decay: float = 0.0,
                 device: torch.device | str | None = None, kind: str | None = None) -> None:
        # Not Optimizer.__init__: the parameter groups are the per-weight optimizers' own (`param_groups`).
        self.defaults = {"lr": lr, "weight_decay": weight_decay}
        groups = [item if isinstance(item, dict) else {"params": [item]} for item in params]
        self.optimizers: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        for group in groups:
            for p in group["params"]:
                self.optimizers[p] = engine.make_optimizer([{**group, "params": [p]}], lr, weight_decay, device,
                                                           kind)
        for p in self.optimizers:
            p.register_post_accumulate_grad_hook(self._step_one)

    def _step_one(self, param: torch.nn.Parameter) -> None:
        optimizer = self.optimizers[param]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Every per-weight optimizer's group, in the weights' order: a schedule that sets their "lr" sets theirs."""
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    @property
    def state(self) -> dict[torch.nn.Parameter, dict[str, Any]]:  # type: ignore[override]
        return {p: s for optimizer in self.optimizers.values() for p, s in optimizer.state.items()}

    def step(self, closure: Any = None) -> None:
        """Nothing: every weight was stepped in backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients left by a backward that did not finish (an error in it); the hooks free the others."""
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """As one optimizer over every weight: weight i's state under i, and its group with ``params`` [i]."""
        state, groups = {}, []
        for i, optimizer in enumerate(self.optimizers.values()):
            one = optimizer.state_dict()
            if 0 in one["state"]:
                state[i] = one["state"][0]
            groups.append({**one["param_groups"][0], "params": [i]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` gave, each weight's into its own optimizer."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.optimizers):
            raise ValueError(f"the state dict holds {len(groups)} weights' optimizers; this one has "
                             f"{len(self.optimizers)}")
        for i, optimizer in enumerate(self.optimizers.values()):
            state = {0: state_dict["state"][i]} if i in state_dict["state"] else {}
            optimizer.load_state_dict({"state": state, "param_groups": [{**groups[i], "params": [0]}]})

    def save(self, directory: Path, names: dict[torch.nn.Parameter, str]) -> None:
        """Write every weight's optimizer state into ``directory`` (``names``: each weight's name): tensors in
        ``optimizer.safetensors`` as "NAME::STATE", the rest (counts, each weight's parameter group) as JSON."""
        from safetensors.torch import save_file

        tensors, scalars, groups, seen = {}, {}, {}, set()
        for p, optimizer in self.optimizers.items():
            one, name = optimizer.state_dict(), names[p]
            state = one["state"].get(0, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    value = value.detach().cpu().contiguous()
                    shared = value.untyped_storage().data_ptr() in seen  # bitsandbytes shares its quantile maps
                    seen.add(value.untyped_storage().data_ptr())
                    tensors[f"{name}{STATE_SEPARATOR}{key}"] = value.clone() if shared else value
            scalars[name] = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
            groups[name] = {k: v for k, v in one["param_groups"][0].items() if k != "params"}
        save_file(tensors, directory / OPTIMIZER_TENSORS)
        write_json(directory / OPTIMIZER_STATE, {"param_groups": groups, "scalars": scalars})

    def load(self, directory: Path, names: dict[torch.nn.Parameter, str]) -> None:
        """Restore what `save` wrote into ``directory``, each weight's state into its own optimizer."""
        saved = json.loads((directory / OPTIMIZER_STATE).read_text())
        states: dict[str, dict[str, Any]] = {name: dict(values) for name, values in saved["scalars"].items()}
        for key, tensor in read_safetensors(directory / OPTIMIZER_TENSORS).items():
            name, _, what = key.rpartition(STATE_SEPARATOR)
            states.setdefault(name, {})[what] = tensor
        for p, optimizer in self.optimizers.items():
            state = states.get(names[p])
            optimizer.load_state_dict({"state": {0: state} if state else {},
                                       "param_groups": [{**saved["param_groups"][names[p]], "params": [0]}]})
