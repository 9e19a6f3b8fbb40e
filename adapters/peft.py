"""A base for strategies built on PEFT, and PEFT's own file format, loaded strictly without pickles.

A strategy that wraps a PEFT method subclasses `PeftStrategy` and writes one method,
``peft_config(model, config, loading)``, returning the PEFT config for ``model``. Applying, the
task-type mapping, saving in PEFT's own format (plain ``PeftModel.from_pretrained(base, directory)``
loads it) and strict loading come from here. To read adapters saved by plain PEFT as well
(`adapters.ImportsPeft`), it sets ``peft_types`` and writes ``options_from_peft`` with
`PeftStrategy.options_from_keys`, which refuses every key of the file it does not account for.
"""
from __future__ import annotations

import json
import warnings
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
# Keys of adapter_config.json that say where and how the file was made, not what its weights mean
# (``auto_mapping``: the model class, which PEFT records when no task_type was given).
PEFT_BOOKKEEPING = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                              "peft_version", "auto_mapping"})
# The heads PEFT itself adds to ``modules_to_save`` for SEQ_CLS, as applying a strategy there does.
PEFT_CLASSIFIER_HEADS = frozenset({"classifier", "score"})


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

    from .tensorfiles import check_keys, read_safetensors

    path = Path(directory) / PEFT_WEIGHTS
    if not path.exists() and (Path(directory) / "adapter_model.bin").exists():
        raise AdaptersError(f"{directory}: holds only a pickled adapter_model.bin; adapters never unpickles. "
                            "Re-save it as safetensors.")
    saved = read_safetensors(path)
    expected = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    check_keys(saved, expected, path)
    set_peft_model_state_dict(model, saved)
    return model


def _get_peft_model(model: torch.nn.Module, peft_config: Any) -> torch.nn.Module:
    """``peft.get_peft_model``, without the FutureWarning it triggers on every call under transformers 5
    (it reads the renamed ``is_gradient_checkpointing``), which users can do nothing about."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)


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
        peft_config = self.peft_config(model, config)
        try:
            return _get_peft_model(model, peft_config)
        except ValueError as exc:  # PEFT's word on modules it cannot adapt (checked on the weightless model first)
            raise AdaptersError(f"strategy {self.name!r} cannot apply to {type(model).__name__}: {exc} "
                                "Choose other --set target_modules=..., or another strategy.") from None

    def save(self, model: torch.nn.Module, directory: Path, config: Any) -> None:
        save_peft(model, directory)

    def load(self, model: torch.nn.Module, directory: Path, config: Any) -> torch.nn.Module:
        return load_peft(_get_peft_model(model, self.peft_config(model, config, loading=True)), directory)

    def options_from_keys(self, peft_config: dict[str, Any], peft_class: type, options: dict[str, str],
                          derived: frozenset[str] | set[str] = frozenset()) -> Any:
        """An instance of ``config_class`` from a PEFT ``adapter_config.json`` (a dict), for ``options_from_peft``.

        ``options`` maps PEFT's keys to this strategy's options (``{"lora_alpha": "alpha"}``), each value
        converted to the option's type (``16.0`` to ``16``; ``8.5`` for an int is refused); ``derived``
        names the keys that ``peft_config`` works out from the base itself (``fan_in_fan_out``) or that
        only matter when PEFT initialises weights, which a load replaces. Every other key must hold
        ``peft_class``'s default (or, for a key this PEFT does not know, nothing), since the strategy has
        no option to express it: anything else raises `AdaptersError` naming the key.
        """
        import dataclasses

        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else None
                    for f in dataclasses.fields(peft_class)}
        classifier = peft_config.get("task_type") == "SEQ_CLS"
        for key, value in sorted(peft_config.items()):
            if key in options or key in derived or key in PEFT_BOOKKEEPING:
                continue
            if key == "modules_to_save" and classifier and set(value or ()) <= PEFT_CLASSIFIER_HEADS:
                continue
            default = defaults.get(key)
            if (_empty(value) and _empty(default)) or _same(value, default):
                continue
            raise AdaptersError(f"adapter_config.json has {key}={value!r}, which strategy {self.name!r} has no option "
                                f"for (it reads {', '.join(options)}). Save the adapter without it, or import it "
                                "with a strategy that can express it.")
        from .options import build_config

        values = {option: peft_config[key] for key, option in options.items() if key in peft_config}
        try:  # each value converted to its option's type, as a manifest's are
            return build_config(self.config_class, values, self.name)
        except AdaptersError as exc:
            mapped = ", ".join(f"{key} -> {option}" for key, option in options.items())
            raise AdaptersError(f"adapter_config.json ({mapped}): {exc}") from None


def _empty(value: Any) -> bool:
    return value is None or value is False or value in ("", [], {})


def _same(value: Any, default: Any) -> bool:
    """A JSON value equal to a PEFT default, which may be a set or a tuple where JSON has a list."""
    if isinstance(default, (set, frozenset, tuple)) and isinstance(value, list):
        return set(value) == set(default) if isinstance(default, (set, frozenset)) else list(default) == value
    return value == default
