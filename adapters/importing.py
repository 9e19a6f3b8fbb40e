"""Bringing in an adapter saved by plain PEFT: ``adapters import DIR --model BASE --output RUN``.

`import_peft` wraps a directory that ``peft`` wrote (``get_peft_model(...).save_pretrained(...)``)
into a complete adapters run, so that load, bench, eval, generate, merge and ``train --resume``
work on it:

1. ``adapter_config.json`` is read as plain JSON; keys that would import or run code (``auto_map``,
   ``trust_remote_code``, an ``auto_mapping`` outside transformers) are refused, and so is a
   directory with only pickled weights (``adapter_model.bin``): only ``adapter_model.safetensors``
   is read;
2. its ``peft_type`` picks the installed strategy that declares `adapters.ImportsPeft` for it, whose
   ``options_from_peft`` turns the file into the strategy's options, refusing keys it cannot express;
3. the base is loaded and the strategy's own ``load`` puts the weights into it, strictly: every key
   present, every shape the base's, every value finite;
4. `adapters.save` writes the run (the manifest with the base's fingerprint, PEFT's files, the
   weights the base lacked), under the same ``--overwrite`` rule as any save.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .contract import ImportsPeft, SavesOwnFormat, Strategy
from .errors import AdaptersError
from .peft import PEFT_CONFIG, PEFT_TASK_TYPES, PEFT_WEIGHTS

# Keys that make transformers run code named in the file. (PEFT's ``auto_mapping`` names a model class
# and the module to import it from; one in transformers is only where the model came from.)
_CODE_KEYS = ("auto_map", "trust_remote_code")
_TASKS = {peft: task for task, peft in PEFT_TASK_TYPES.items()}  # "CAUSAL_LM" -> "causal-lm"


@dataclasses.dataclass
class ImportResult:
    """The run ``adapters import`` wrote, and what it was made from."""

    output: Path
    directory: str  # the PEFT directory it was read from
    peft_type: str
    strategy: str
    options: dict[str, Any]
    base_model: str
    fingerprint: str
    task: str
    quantization: str
    parameters: int  # adapter parameters read and checked

    def summary(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "output": str(self.output)}


def import_peft(directory: str | Path, model: str, output: str | Path, *, quantization: str = "none",
                labels: list[str] | None = None, overwrite: bool = False, device: Any = None) -> ImportResult:
    """Wrap the PEFT adapter saved in ``directory``, made for base ``model``, into an adapters run at ``output``.

    ``quantization`` is the base the run records (nf4 for an adapter trained with QLoRA). For a SEQ_CLS
    adapter, ``labels`` names the classes (default: ``LABEL_0``, ``LABEL_1``, ... as many as its head has).
    Raises `AdaptersError` naming what is in the way: the file, the key, the parameter whose shape
    differs from the base's.
    """
    from .loading import load_base_model
    from .store import check_output_dir, save
    from .tensorfiles import read_safetensors

    directory = Path(directory)
    peft_config = read_peft_config(directory)
    weights = read_safetensors(peft_weights(directory))  # finite, and never a pickle
    strategy = strategy_for(peft_config["peft_type"], directory)
    options = strategy.options_from_peft(peft_config)
    task = peft_task(peft_config, directory)
    for what, value, supported in (("task", task, strategy.supported_tasks),
                                   ("quantization", quantization, strategy.supported_quantization)):
        if value not in supported:
            raise AdaptersError(f"{directory}: strategy {strategy.name!r} does not support {what} {value} "
                                f"(it supports: {', '.join(sorted(supported))}).")
    if task == "sequence-classification":
        labels = labels or [f"LABEL_{i}" for i in range(head_rows(weights, directory))]
    output = check_output_dir(output, overwrite)
    if output.resolve() == directory.resolve():
        raise AdaptersError(f"--output {output}: is the PEFT directory being imported. Choose a new directory.")

    base = load_base_model(model, quantization, task, labels, device)
    try:
        trained = strategy.load(base.model, directory, options)
    except AdaptersError as exc:
        raise AdaptersError(f"{directory} does not fit --model {model}: {exc}") from None
    source = {"directory": str(directory), "peft_type": peft_config["peft_type"],
              "peft_version": peft_config.get("peft_version")}
    save(trained, output, strategy=strategy, config=options, base=base, overwrite=overwrite,
         training={"imported_from": source})
    return ImportResult(output, str(directory), peft_config["peft_type"], strategy.name,
                        dataclasses.asdict(options), base.name, base.fingerprint, task, quantization,
                        sum(t.numel() for t in weights.values()))


def read_peft_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json`` as plain JSON, refused when it would import or run code, or names no PEFT type."""
    if not directory.is_dir():
        raise AdaptersError(f"{directory}: not a directory. Give the directory PEFT's save_pretrained wrote.")
    path = directory / PEFT_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdaptersError(f"{directory}: no {PEFT_CONFIG}, so it is no PEFT adapter. Give the directory "
                            "PEFT's save_pretrained wrote.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdaptersError(f"{path}: not valid JSON ({exc}). Save the adapter again with PEFT.") from None
    if not isinstance(data, dict):
        raise AdaptersError(f"{path}: not a JSON object. Save the adapter again with PEFT.")
    mapping = data.get("auto_mapping")
    library = mapping.get("parent_library") if isinstance(mapping, dict) else mapping
    outside = mapping is not None and not (isinstance(library, str) and library.partition(".")[0] == "transformers")
    for key in (*_CODE_KEYS, "auto_mapping") if outside else _CODE_KEYS:
        if _holds(data, key):
            raise AdaptersError(f"{path}: holds {key!r}, which names code to import or run; adapters never runs "
                                "code from a file. Remove it, or save the adapter from a model transformers knows.")
    if not isinstance(data.get("peft_type"), str):
        raise AdaptersError(f"{path}: no peft_type, so the PEFT method is unknown. Save the adapter again with PEFT.")
    return data


def _holds(data: Any, key: str) -> bool:
    """Whether ``key`` holds a value (not null) anywhere in ``data``."""
    if isinstance(data, dict):
        return data.get(key) is not None or any(_holds(v, key) for v in data.values())
    return isinstance(data, list) and any(_holds(v, key) for v in data)


def peft_weights(directory: Path) -> Path:
    """``adapter_model.safetensors``; a directory with pickled weights only is refused, unread."""
    path = directory / PEFT_WEIGHTS
    if path.is_file():
        return path
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if pickled:
        raise AdaptersError(f"{directory}: holds only pickled weights ({pickled[0]}), and adapters never unpickles. "
                            "Re-save the adapter as safetensors where you trust the file (PEFT's save_pretrained "
                            "does by default).")
    raise AdaptersError(f"{directory}: no {PEFT_WEIGHTS}. Give the directory PEFT's save_pretrained wrote.")


def strategy_for(peft_type: str, directory: Path) -> Strategy:
    """The installed strategy that declares it reads ``peft_type`` (`ImportsPeft`); the first by name if several."""
    from .host import get_registry

    readers = [e.strategy for e in get_registry().entries(aliases=False) if isinstance(e.strategy, ImportsPeft)]
    for strategy in readers:
        if peft_type in strategy.peft_types:
            if not isinstance(strategy, SavesOwnFormat):
                raise AdaptersError(f"strategy {strategy.name!r} declares it reads PEFT's {peft_type} but has no "
                                    "load(model, directory, config) to read PEFT's files. Fix the plugin.")
            return strategy
    known = ", ".join(f"{t} ({s.name})" for s in readers for t in sorted(s.peft_types)) or "none"
    raise AdaptersError(f"{directory}: a PEFT {peft_type} adapter, which no installed strategy reads (they read: "
                        f"{known}). Install a plugin that declares adapters.ImportsPeft for {peft_type}.")


def peft_task(peft_config: dict[str, Any], directory: Path) -> str:
    """The adapters task of PEFT's ``task_type``; without one, of the model class PEFT recorded instead."""
    made_on = str((peft_config.get("auto_mapping") or {}).get("base_model_class", ""))
    task_type = peft_config.get("task_type") or ("SEQ_CLS" if made_on.endswith("ForSequenceClassification")
                                                 else "CAUSAL_LM")
    if task_type not in _TASKS:
        raise AdaptersError(f"{directory}: task_type {task_type!r}, which adapters does not train (it trains "
                            f"{', '.join(_TASKS)}).")
    return _TASKS[task_type]


def head_rows(weights: dict[str, Any], directory: Path) -> int:
    """How many classes a SEQ_CLS adapter's head has: the rows of its saved classification head."""
    from .peft import PEFT_CLASSIFIER_HEADS

    rows = {int(t.shape[0]) for name, t in weights.items() if t.dim() == 2 and
            any(f".{head}." in f".{name}" for head in PEFT_CLASSIFIER_HEADS)}
    if len(rows) != 1:
        raise AdaptersError(f"{directory}: a SEQ_CLS adapter without a saved classification head, so the number of "
                            "classes is unknown. Pass the labels (--labels a,b,...).")
    return rows.pop()
