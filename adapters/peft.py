"""A base for strategies built on PEFT, and PEFT's own file format, loaded strictly without pickles.

A strategy that wraps a PEFT method subclasses `PeftStrategy` and writes one method,
``peft_config(model, config, loading)``, returning the PEFT config for ``model``. Applying, the
task-type mapping, saving in PEFT's own format (plain ``PeftModel.from_pretrained(base, directory)``
loads it) and strict loading come from here.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .contract import StrategyBase
from .errors import AdaptersError

if TYPE_CHECKING:
    import torch

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}


def peft_task_type(model: torch.nn.Module) -> str:
    """PEFT's ``task_type`` for a transformers model: ``"CAUSAL_LM"`` or ``"SEQ_CLS"``."""
    from .nn import task_of

    return PEFT_TASK_TYPES[task_of(model)]


def save_peft(model: torch.nn.Module, directory: Path) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``."""
    model.save_pretrained(directory, safe_serialization=True)


def load_peft(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """Load PEFT adapter weights from ``directory`` into ``model``, a freshly applied PeftModel.

    Unlike PEFT's own loader, missing or unexpected keys are an error, never a warning that leaves
    freshly initialised weights in place.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from .store import check_keys, read_safetensors

    path = Path(directory) / PEFT_WEIGHTS
    if not path.exists() and (Path(directory) / "adapter_model.bin").exists():
        raise AdaptersError(f"{directory}: holds only a pickled adapter_model.bin; adapters never unpickles. "
                            "Re-save it as safetensors.")
    saved = read_safetensors(path)
    expected = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    check_keys(saved, expected, path)
    set_peft_model_state_dict(model, saved)
    return model


class PeftStrategy(StrategyBase):
    """A strategy that applies one PEFT method; subclasses write `peft_config`.

    Saves in PEFT's own format, so its directories load with plain PEFT too.
    """

    def peft_config(self, model: torch.nn.Module, config: Any, loading: bool = False) -> Any:
        """The ``peft.PeftConfig`` for ``model``; ``loading`` is True when it is for `load`.

        Raise `AdaptersError` for options that cannot apply, before anything changes.
        """
        raise NotImplementedError

    def apply(self, model: torch.nn.Module, config: Any) -> torch.nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(model, config))

    def save(self, model: torch.nn.Module, directory: Path, config: Any) -> None:
        save_peft(model, directory)

    def load(self, model: torch.nn.Module, directory: Path, config: Any) -> torch.nn.Module:
        from peft import get_peft_model

        return load_peft(get_peft_model(model, self.peft_config(model, config, loading=True)), directory)
