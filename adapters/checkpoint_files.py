"""Checking a local checkpoint folder before transformers reads any of it: no remote code, a model type this
transformers knows, weights only as safetensors (never a pickle) and whole, and the tasks it can serve.

`adapters.models` names and locates checkpoints; these checks are what it runs on a folder or a download.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from .contract import TASKS
from .errors import AdaptersError

_WEIGHTS = "model.safetensors"
_WEIGHTS_INDEX = "model.safetensors.index.json"
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_checkpoint(directory: Path, name: str) -> dict[str, Any]:
    """Check a local checkpoint's config before transformers reads any of it; returns its config.json.

    Refused, each with a one-line error: a config.json or tokenizer_config.json that is not a JSON
    object or holds an ``auto_map`` (remote code, which adapters never runs), and a ``model_type`` this
    transformers does not know. The weights are checked when the checkpoint is located for loading
    (`weight_files`): planning needs only config.json.
    """
    config = check_no_remote_code(directory, name)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        import transformers

        raise AdaptersError(
            f"--model {name}: config.json has model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know. Use a model that transformers supports natively."
        )
    return config


def check_no_remote_code(directory: Path, name: str) -> dict[str, Any]:
    """Refuse a checkpoint whose config.json or tokenizer_config.json has an ``auto_map``, read as plain
    JSON before transformers sees them (transformers would ask on stdin whether to run the code);
    returns config.json."""
    config = _read_json(directory / "config.json", name)
    for path in (directory / "config.json", directory / "tokenizer_config.json"):
        data = config if path.name == "config.json" else _read_json(path, name) if path.exists() else {}
        if _has_key(data, "auto_map"):
            raise AdaptersError(
                f"--model {name}: {path.name} has an auto_map, so it needs remote code (Python files of its "
                "own), which adapters never runs. Use a model that transformers supports natively."
            )
    return config


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdaptersError(f"--model {name}: {path.name} is not valid JSON ({_first_line(exc)}). "
                            "Restore the file from where the model came from.") from None
    if not isinstance(data, dict):
        raise AdaptersError(f"--model {name}: {path.name} is not a JSON object. "
                            "Restore the file from where the model came from.")
    return data


def _has_key(data: Any, key: str) -> bool:
    if isinstance(data, dict):
        return key in data or any(_has_key(v, key) for v in data.values())
    return isinstance(data, list) and any(_has_key(v, key) for v in data)


def weight_files(directory: Path, name: str) -> list[Path]:
    """The safetensors files that hold a checkpoint's weights, each checked to be whole.

    ``model.safetensors``, or the shards that ``model.safetensors.index.json`` names. Pickled
    weights (``pytorch_model.bin``) are refused: adapters never unpickles.
    """
    if not directory.is_dir():
        raise AdaptersError(f"--model {name}: {directory} is not a checkpoint directory. Point it at one.")
    if (directory / _WEIGHTS_INDEX).exists():
        weight_map = _read_json(directory / _WEIGHTS_INDEX, name).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise AdaptersError(f"--model {name}: {_WEIGHTS_INDEX} has no weight_map. "
                                "Restore the file from where the model came from.")
        files = sorted({directory / str(f) for f in weight_map.values()})
    elif (directory / _WEIGHTS).exists():
        files = [directory / _WEIGHTS]
    else:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLED)
        if pickled:
            raise AdaptersError(
                f"--model {name}: holds only pickled weights ({pickled[0]}), and adapters never unpickles. "
                "Convert them to safetensors where you trust the file (save_pretrained does by default)."
            )
        raise AdaptersError(f"--model {name}: no {_WEIGHTS} in the folder. Add the checkpoint's weights.")
    for path in files:
        _check_safetensors(path, name)
    return files


def _check_safetensors(path: Path, name: str) -> None:
    """A safetensors file's header, and its length against the header's offsets (no tensor is read)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
            if header_len > size - 8:
                raise ValueError("shorter than its header")
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ValueError(f"{size} bytes, but its tensors end at byte {8 + header_len + end}")
    except FileNotFoundError:
        raise AdaptersError(f"--model {name}: {path.name} is missing. Add the checkpoint's weights.") from None
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise AdaptersError(f"--model {name}: {path.name} is truncated or not a safetensors file "
                            f"({_first_line(exc)}). Copy or download it again.") from None


def checkpoint_tasks(config: dict[str, Any], name: str) -> tuple[str, ...]:
    """The tasks transformers has a model class for, for a checkpoint's config.json; a checkpoint
    fine-tuned for classification (its ``architectures``) serves that first."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    mappings = {"causal-lm": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                "sequence-classification": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES}
    tasks = [task for task in TASKS if config.get("model_type") in mappings[task]]
    if not tasks:
        raise AdaptersError(f"--model {name}: transformers has no causal-lm or sequence-classification model "
                            f"for model_type {config.get('model_type')!r}. Use another model.")
    if set(config.get("architectures") or ()) & set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()):
        tasks.sort(key=lambda task: task != "sequence-classification")
    return tuple(tasks)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
