"""A base for strategies built on PEFT, and PEFT's own file format, loaded strictly without pickles.

A strategy that wraps a PEFT method subclasses `PeftStrategy` and writes one method,
``peft_config(model, config, loading)``, returning the PEFT config for ``model``. Applying, the
task-type mapping, saving in PEFT's own format (plain ``PeftModel.from_pretrained(base, directory)``
loads it) and strict loading come from here. To read adapters saved by plain PEFT as well
(`adapters.ImportsPeft`), it sets ``peft_types`` and writes ``options_from_peft`` with
`PeftStrategy.options_from_keys`, which refuses every key of the file it does not account for.
"""
from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
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
        return self.apply_config(model, self.peft_config(model, config))

    def apply_config(self, model: torch.nn.Module, peft_config: Any) -> torch.nn.Module:
        """``model`` with ``peft_config`` applied (``peft.get_peft_model``): what `apply` does with `peft_config`'s
        config, for a strategy that builds the config itself (e.g. after computing something from data). PEFT's
        refusal of the layers becomes an `AdaptersError`."""
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


# ------------------------------------------------------------------------------- PEFT's methods, described

# Fields of a prompt-learning config that PEFT fills in from the base model itself.
PEFT_DERIVED = frozenset({"token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"})
_ATOMS = {bool: "bool", int: "int", float: "float", str: "str", type(None): "None"}


@dataclass(frozen=True)
class PeftOption:
    """One field of a PEFT config class, as `peft_methods` describes it."""

    name: str
    types: tuple[str, ...]  # of "bool", "int", "float", "str", "list[str]", "list[int]", "None", in PEFT's order
    default: Any  # PEFT's default, as JSON (an Enum's value)
    choices: tuple[str, ...] = ()  # the only strings allowed (a Literal or an Enum), when not any string is
    help: str = ""  # PEFT's help text


@dataclass(frozen=True)
class PeftMethod:
    """One method the installed PEFT registers (``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``), as PEFT declares it."""

    peft_type: str  # "LOHA"
    config_class: str  # its config class's name in ``peft`` ("LoHaConfig")
    kind: str  # "layers" (a tuner that wraps layers), "prompt" (prompt learning) or "adaption-prompt"
    options: tuple[PeftOption, ...]  # the config's fields but PEFT's bookkeeping and those of no simple type
    tasks: tuple[str, ...]  # the tasks (of adapters.TASKS) whose PEFT task type its config accepts
    bnb_layers: tuple[str, ...]  # "4bit", "8bit": the bitsandbytes layers PEFT has for it
    merges: bool  # its layers implement ``merge``, so ``merge_and_unload`` folds them into the base
    model_types: tuple[str, ...] | None  # the model types PEFT limits it to, where it lists them
    unusable: str | None  # PEFT's error when its config cannot be built from its own defaults


def peft_methods() -> tuple[PeftMethod, ...]:
    """Every method the installed PEFT registers, with what PEFT declares about it, by PEFT type.

    Read from PEFT's registry in a separate interpreter, once per version of PEFT, transformers and
    bitsandbytes, and cached, so that listing strategies imports neither torch nor PEFT here.
    """
    import hashlib
    import importlib.metadata

    versions = []
    for distribution in ("peft", "transformers", "bitsandbytes"):
        try:
            versions.append(importlib.metadata.version(distribution))
        except importlib.metadata.PackageNotFoundError:
            versions.append("-")
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]  # how this module describes them
    return _cached_methods(f"{'-'.join(versions)}-{source}")


@functools.cache
def _cached_methods(key: str) -> tuple[PeftMethod, ...]:
    from .files import cache_dir, write_json

    root = cache_dir()
    path = root / f"peft-methods-{key}.json"
    try:
        described = json.loads(path.read_text())
    except (OSError, ValueError):
        described = _describe_elsewhere()
        try:
            root.mkdir(parents=True, exist_ok=True)
            write_json(path, described)
        except OSError:  # a cache that cannot be written only means reading PEFT again next time
            pass

    def option(o: dict[str, Any]) -> PeftOption:
        return PeftOption(o["name"], tuple(o["types"]), o["default"], tuple(o["choices"]), o["help"])

    return tuple(PeftMethod(m["peft_type"], m["config_class"], m["kind"], tuple(map(option, m["options"])),
                            tuple(m["tasks"]), tuple(m["bnb_layers"]), m["merges"],
                            None if m["model_types"] is None else tuple(m["model_types"]), m["unusable"])
                 for m in described)


def _describe_elsewhere() -> list[dict[str, Any]]:
    """`describe_peft` in a fresh interpreter, where importing PEFT (and torch) costs this one nothing."""
    import subprocess
    import sys

    code = "import json, sys\nfrom adapters.peft import describe_peft\nsys.stdout.write(json.dumps(describe_peft()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise AdaptersError(f"could not read the installed PEFT's methods: {last}. Check that `python -c "
                            "'import peft'` works, or reinstall peft.")
    return json.loads(done.stdout)


def describe_peft() -> list[dict[str, Any]]:
    """`peft_methods`, read from the PEFT imported here, as JSON: what the separate interpreter prints."""
    import warnings

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # configs built from defaults warn about what a real use would set
        return [_describe(str(t.value), config_class, PEFT_TYPE_TO_TUNER_MAPPING.get(t))
                for t, config_class in sorted(PEFT_TYPE_TO_CONFIG_MAPPING.items(), key=lambda kv: str(kv[0].value))]


def _describe(peft_type: str, config_class: type, tuner: type | None) -> dict[str, Any]:
    import dataclasses
    import sys

    from peft.config import PeftConfig

    built, errors = {}, []
    for task, task_type in PEFT_TASK_TYPES.items():
        try:
            built[task] = config_class(task_type=task_type)
        except Exception as exc:  # noqa: BLE001 - PEFT's own word on what it cannot be built for
            errors.append(f"{type(exc).__name__}: {exc}")
    sample = next(iter(built.values()), None)
    kind = "layers" if sample is None or not (sample.is_prompt_learning or sample.is_adaption_prompt) else \
        "prompt" if sample.is_prompt_learning else "adaption-prompt"
    bookkeeping = {f.name for f in dataclasses.fields(PeftConfig)} | PEFT_DERIVED
    options = [o for f in dataclasses.fields(config_class) if f.name not in bookkeeping
               and (o := _option(f, config_class)) is not None]
    listed = getattr(sys.modules[config_class.__module__], "TRANSFORMERS_MODEL_CONFIG", None)
    return {"peft_type": peft_type, "config_class": config_class.__name__, "kind": kind, "options": options,
            "tasks": list(built), "bnb_layers": _bnb_layers(tuner), "merges": _merges(tuner),
            "model_types": sorted(listed) if isinstance(listed, dict) else None,
            "unusable": None if built else errors[0]}


def _option(f: Any, config_class: type) -> dict[str, Any] | None:
    """A config field as a `PeftOption` (JSON), or None when its type or default is not one a user can write."""
    import dataclasses
    import enum
    import types
    import typing

    hint = typing.get_type_hints(config_class)[f.name]
    parts = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    atoms, choices = [], []
    for part in parts:
        if typing.get_origin(part) is typing.Literal:
            atom, choices = "str", [*choices, *map(str, typing.get_args(part))]
        elif isinstance(part, type) and issubclass(part, enum.Enum):
            atom, choices = "str", [*choices, *(str(m.value) for m in part)]
        elif typing.get_origin(part) is list and typing.get_args(part) in ((str,), (int,)):
            atom = f"list[{typing.get_args(part)[0].__name__}]"
        else:
            atom = _ATOMS.get(part)
        if atom is None:
            return None  # a dict, a tuple, a nested config: nothing --set could write
        if atom not in atoms:
            atoms.append(atom)
    if str in parts:
        choices = []  # any string, beside the named ones
    default = f.default if f.default is not dataclasses.MISSING else \
        f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
    if isinstance(default, enum.Enum):
        default = default.value
    if default is dataclasses.MISSING or not _is_json(default):
        return None
    if default is None and "None" not in atoms:  # PEFT's `int = None`: unset until PEFT works it out
        atoms.append("None")
    return {"name": f.name, "types": atoms, "default": default, "choices": choices,
            "help": " ".join(str(f.metadata.get("help", "")).split())}


def _is_json(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    return value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and value == value)


def _bnb_layers(tuner: type | None) -> list[str]:
    """Which bitsandbytes layers PEFT defines for the tuner (its ``bnb`` module defines them where bitsandbytes is)."""
    import importlib
    import importlib.util

    if tuner is None:
        return []
    name = tuner.__module__.rsplit(".", 1)[0] + ".bnb"
    if importlib.util.find_spec(name) is None:
        return []
    module = importlib.import_module(name)
    defined = [n for n, v in vars(module).items() if isinstance(v, type) and v.__module__ == name]
    return [bits for bits in ("4bit", "8bit") if any(bits in n for n in defined)]


def _merges(tuner: type | None) -> bool:
    """Whether a layer of the tuner implements ``merge`` (PEFT's base layer only raises)."""
    import importlib
    import importlib.util

    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = getattr(tuner, "tuner_layer_cls", None)
    name = tuner.__module__.rsplit(".", 1)[0] + ".layer" if tuner is not None else ""
    if layer is None or importlib.util.find_spec(name) is None:
        return False
    module = importlib.import_module(name)
    return any(isinstance(v, type) and issubclass(v, layer) and v.merge is not BaseTunerLayer.merge
               for v in vars(module).values())
