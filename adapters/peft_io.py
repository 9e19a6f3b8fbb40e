"""Save and load PEFT models in PEFT's own format, strictly and without pickles.

For strategies built on PEFT: the directory they write loads with plain
``peft.PeftModel.from_pretrained(base, directory)``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import AdaptersError
from .store import check_keys, read_safetensors

PEFT_WEIGHTS = "adapter_model.safetensors"


def save_peft(model: torch.nn.Module, directory: Path) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``."""
    model.save_pretrained(directory, safe_serialization=True)


def load_peft(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """Load PEFT adapter weights from ``directory`` into ``model``, a freshly applied PeftModel.

    Unlike PEFT's own loader, missing or unexpected keys are an error, never a warning that leaves
    freshly initialised weights in place.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    path = Path(directory) / PEFT_WEIGHTS
    if not path.exists() and (Path(directory) / "adapter_model.bin").exists():
        raise AdaptersError(f"{directory}: holds only a pickled adapter_model.bin; adapters never unpickles. "
                            "Re-save it as safetensors.")
    saved = read_safetensors(path)
    expected = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    check_keys(saved, expected, path)
    set_peft_model_state_dict(model, saved)
    return model
