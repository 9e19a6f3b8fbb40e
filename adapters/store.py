"""Saving and loading trained strategies: safetensors weights plus a JSON manifest, written atomically.

A saved directory holds the strategy's weights (PEFT's own files for the PEFT-backed strategies,
``weights.safetensors`` by default) and ``adapters.json``, the manifest: strategy, options, base
model identity and fingerprint, package versions. The manifest is written last, inside a temp
directory that is renamed into place, so a crash never leaves a directory that looks complete.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any

import torch

from .contract import SavesOwnFormat, Strategy
from .errors import AdaptersError
from .files import write_json
from .manifest import FORMAT_VERSION, MANIFEST, Manifest, read_manifest
from .nn import trainable_parameters

WEIGHTS = "weights.safetensors"


def package_versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Versions of the packages a result depends on; ours under the key "adapters"."""
    from .host.manager import DISTRIBUTION

    versions = {}
    for key, dist in (("adapters", DISTRIBUTION), *((d, d) for d in ("torch", "transformers", "peft", "accelerate",
                                                                        "bitsandbytes", "safetensors", "pluggy"))):
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    versions.update(extra or {})
    return versions


def check_output_dir(directory: str | Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty output directory unless ``overwrite``; call before long work."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise AdaptersError(f"--output {path}: exists and is not a directory. Choose another path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise AdaptersError(
            f"--output {path}: directory exists and is not empty. Choose a new path, or pass --overwrite."
        )
    return path


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, refusing anything else by content (never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("too short")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > path.stat().st_size - 8 or f.read(1) != b"{":
                raise ValueError("no safetensors header")
        return load_file(path)
    except FileNotFoundError:
        raise AdaptersError(f"{path}: file not found; the saved directory is incomplete. Save it again.") from None
    except (ValueError, SafetensorError, OSError) as exc:
        raise AdaptersError(
            f"{path}: not a safetensors file ({exc}); adapters never loads pickles. "
            "Re-save the weights in safetensors format."
        ) from None


def save_trainable(model: torch.nn.Module, directory: Path) -> None:
    """The core's default save: every trainable parameter, in one safetensors file."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model)}
    save_file(tensors, directory / WEIGHTS)


def load_trainable(model: torch.nn.Module, directory: Path) -> None:
    """The core's default load: strict, by name; lists missing/unexpected keys and shape mismatches."""
    saved = read_safetensors(directory / WEIGHTS)
    params = dict(trainable_parameters(model))
    check_keys(saved, {n: p.shape for n, p in params.items()}, directory / WEIGHTS)
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def check_keys(saved: dict[str, torch.Tensor], expected: dict[str, torch.Size], path: Path) -> None:
    """Refuse weights whose names or shapes differ from what the model expects."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}")
        raise AdaptersError(
            f"{path}: {'; '.join(parts)}. The weights do not match this strategy and config; "
            "load them with the options they were saved with."
        )
    for name, shape in expected.items():
        if tuple(saved[name].shape) != tuple(shape):
            raise AdaptersError(
                f"{path}: parameter {name} has shape {tuple(saved[name].shape)} in the file but "
                f"{tuple(shape)} in the model. Load it onto the base it was trained on."
            )


def save(
    model: torch.nn.Module,
    directory: str | Path,
    *,
    strategy: Strategy,
    config: Any,
    base: Any,
    overwrite: bool = False,
    training: dict[str, Any] | None = None,
    plugin_versions: dict[str, str] | None = None,
    keep: tuple[str, ...] = (),
) -> Path:
    """Save a trained strategy to ``directory`` atomically; ``base`` is the `BaseModel` it was applied to.

    Nothing saved is ever lost: without ``overwrite`` an existing non-empty directory is refused,
    and with it the old directory is replaced only once the new one is complete. The entries named
    in ``keep`` (a run's checkpoints and logs) move from the old directory into the new one.
    """
    from .loading import architecture

    directory = check_output_dir(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if isinstance(strategy, SavesOwnFormat):
            strategy.save(model, tmp, config)
        else:
            save_trainable(model, tmp)
        manifest = Manifest(
            format_version=FORMAT_VERSION, strategy=strategy.name, config=dataclasses.asdict(config),
            base_model=base.name, quantization=base.quantization, task=base.task, labels=base.labels,
            fingerprint=base.fingerprint, shape=architecture(base.model),
            files=sorted(p.name for p in tmp.iterdir()), versions=package_versions(plugin_versions), training=training,
        )
        write_json(tmp / MANIFEST, manifest.to_dict())
        _replace_dir(tmp, directory, keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _replace_dir(new: Path, target: Path, keep: tuple[str, ...] = ()) -> None:
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)  # put the previous save back where it was
            raise
        for name in keep:
            if (old / name).exists():
                os.replace(old / name, target / name)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


@dataclasses.dataclass
class Loaded:
    """A saved strategy restored onto its base model."""

    model: torch.nn.Module
    base: Any  # the BaseModel it was applied to
    strategy: Strategy
    config: Any
    manifest: Manifest


def load(directory: str | Path, base: Any = None, *, device: Any = None) -> Loaded:
    """Restore any saved strategy from ``directory``.

    ``base`` is a model name, a `BaseModel` from `load_base_model`, or None for the base named in the
    manifest. A base whose shapes or weights fingerprint differ from the saved one is refused.
    """
    from .host import get_registry
    from .loading import BaseModel, architecture, load_base_model
    from .options import build_config

    directory = Path(directory)
    manifest = read_manifest(directory)
    strategy = get_registry().get(manifest.strategy)
    try:
        config = build_config(strategy.config_class, manifest.config, strategy.name)
    except AdaptersError as exc:
        raise AdaptersError(f"{directory / MANIFEST}: {exc}") from None
    if not isinstance(base, BaseModel):
        base = load_base_model(base or manifest.base_model, manifest.quantization, manifest.task,
                               manifest.labels or None, device)
    if base.task != manifest.task:
        raise AdaptersError(f"{directory}: saved for task {manifest.task}, but {base.name!r} was loaded for "
                            f"{base.task}. Load the base with task={manifest.task!r}.")
    if base.quantization not in strategy.supported_quantization:
        raise AdaptersError(
            f"{directory}: strategy {strategy.name!r} cannot load onto a {base.quantization}-quantized base "
            f"(it supports: {', '.join(sorted(strategy.supported_quantization))}). Load the base unquantized."
        )
    shape = architecture(base.model)
    for key, saved in manifest.shape.items():
        if shape.get(key) != saved:
            raise AdaptersError(
                f"{directory}: saved for a base with {key}={saved}, but {base.name!r} has {key}={shape.get(key)}. "
                f"Load it onto {manifest.base_model!r}."
            )
    if base.fingerprint != manifest.fingerprint:
        raise AdaptersError(
            f"{directory}: saved for base {manifest.base_model!r} (fingerprint {manifest.fingerprint}), "
            f"but {base.name!r} has other weights (fingerprint {base.fingerprint}). Load it onto the base it was "
            "trained on."
        )
    return Loaded(restore(strategy, base.model, directory, config), base, strategy, config, manifest)


def restore(strategy: Strategy, model: torch.nn.Module, directory: Path, config: Any) -> torch.nn.Module:
    """``strategy`` applied to a fresh base ``model``, with the trained weights saved in ``directory``."""
    if isinstance(strategy, SavesOwnFormat):
        return strategy.load(model, directory, config)
    model = strategy.apply(model, config)
    load_trainable(model, directory)
    return model
