"""A base for strategies built on PEFT, and PEFT's own file format, loaded strictly without pickles.

A strategy that wraps a PEFT method subclasses `PeftStrategy` and writes one method,
``peft_config(model, config, loading)``, returning the PEFT config for ``model``. Applying, the
task-type mapping, saving in PEFT's own format (plain ``PeftModel.from_pretrained(base, directory)``
loads it) and strict loading come from here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .contract import StrategyBase
from .errors import AdaptersError

if TYPE_CHECKING:
    import torch

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
MODEL_CARD = "README.md"
PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}


def peft_task_type(model: torch.nn.Module) -> str:
    """PEFT's ``task_type`` for a transformers model: ``"CAUSAL_LM"`` or ``"SEQ_CLS"``."""
    from .nn import task_of

    return PEFT_TASK_TYPES[task_of(model)]


def name_base(directory: Path, base_model: torch.nn.Module, name: str) -> None:
    """Call the base ``name`` in the files PEFT wrote into ``directory``, instead of the path it was loaded from.

    PEFT writes the base's ``name_or_path`` into ``adapter_config.json`` (``base_model_name_or_path``)
    and into its model card (``README.md``); a local path there tells where the files were on the
    machine that saved them, and means nothing anywhere else. (PEFT needs the path while it saves, to
    compare the vocabulary with the base's own config, so the files are renamed afterwards.)
    """
    from .files import write_atomic, write_json

    config = directory / PEFT_CONFIG
    if config.exists():
        data = json.loads(config.read_text())
        if isinstance(data, dict) and data.get("base_model_name_or_path"):
            write_json(config, {**data, "base_model_name_or_path": name})
    card = directory / MODEL_CARD
    hf_config = getattr(base_model, "config", None)
    known = (getattr(hf_config, "_name_or_path", None), getattr(base_model, "name_or_path", None))
    paths = sorted({str(p) for p in known if p and str(p) != name}, key=len, reverse=True)  # longest first
    if card.exists() and paths:
        text = card.read_text()
        for path in paths:
            text = text.replace(path, name)
        write_atomic(card, text)


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

        peft_config = self.peft_config(model, config)
        try:
            return get_peft_model(model, peft_config)
        except ValueError as exc:  # PEFT's word on modules it cannot adapt (checked on the weightless model first)
            raise AdaptersError(f"strategy {self.name!r} cannot apply to {type(model).__name__}: {exc} "
                                "Choose other --set target_modules=..., or another strategy.") from None

    def save(self, model: torch.nn.Module, directory: Path, config: Any) -> None:
        save_peft(model, directory)

    def load(self, model: torch.nn.Module, directory: Path, config: Any) -> torch.nn.Module:
        from peft import get_peft_model

        return load_peft(get_peft_model(model, self.peft_config(model, config, loading=True)), directory)
