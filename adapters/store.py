"""Saving and loading trained strategies: safetensors weights plus a JSON manifest, written atomically.

A saved directory holds the strategy's weights (PEFT's own files for the PEFT-backed strategies,
``weights.safetensors`` by default), the weights its base checkpoint lacked as they were initialised
(``new-weights.safetensors``: a new classification head, whatever the strategy trains) and
``adapters.json``, the manifest: strategy, options, base model identity and fingerprint, package
versions. The manifest is written last, inside a temp directory that is fsynced and renamed into
place, so a crash never leaves a directory that looks complete. Only finite weights are written or
read back, and ``--overwrite`` replaces only a directory that is adapters' own (`foreign_entries`).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import msgspec
import torch

from .checkpoints import CHECKPOINTS
from .contract import SavesOwnFormat, Strategy
from .errors import AdaptersError, OtherBase
from .files import recover_dir, replace_dir, temp_sibling, write_json
from .manifest import FORMAT_VERSION, MANIFEST, RUN_ENTRIES, Manifest, read_manifest
from .nn import trainable_parameters
from .peft import name_base
from .tensorfiles import check_keys, first_non_finite, read_safetensors

WEIGHTS = "weights.safetensors"
NEW_WEIGHTS = "new-weights.safetensors"  # what the base checkpoint lacked, as it was initialised
_CHECKPOINT_ENTRY = re.compile(r"step-\d+|\.step-\d+\.tmp-[\w-]+")  # a complete checkpoint, or one a kill cut short
_PEFT_INFIX = re.compile(r"\.(?:base_layer|original_module)(?=\.)")  # PEFT's wrappers, between a module and its weight


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
    """Refuse an output directory that a save could not replace without loss; call before long work.

    An existing non-empty directory needs ``overwrite``, and even then only one that is adapters' own
    (see `foreign_entries`) is replaced. A previous save that a kill left aside is put back first.
    """
    if "\0" in str(directory):
        raise AdaptersError(f"--output {str(directory)!r}: holds a NUL character, which no file name may. "
                            "Choose another path.")
    path = Path(directory)
    recover_dir(path, RUN_ENTRIES)
    if path.is_symlink():
        raise AdaptersError(f"--output {path}: is a symbolic link, which a save would replace instead of the folder "
                            "it points to. Give that folder's own path.")
    if path.exists() and not path.is_dir():
        raise AdaptersError(f"--output {path}: exists and is not a directory. Choose another path.")
    here = Path.cwd().resolve()
    if path.resolve() in (here, *here.parents):
        raise AdaptersError(f"--output {path}: is the current directory or one above it, which a save would replace "
                            "as a whole. Give a new directory, e.g. --output run.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise AdaptersError(
                f"--output {path}: directory exists and is not empty. Choose a new path, or pass --overwrite."
            )
        foreign = foreign_entries(path)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise AdaptersError(f"--output {path}: holds {shown}, which no adapters save or run wrote, so --overwrite "
                                "will not replace it. Choose another --output directory.")
    return path


def foreign_entries(path: str | Path) -> list[str]:
    """The entries of ``path`` that adapters did not write, which replacing ``path`` would lose; sorted.

    adapters' own: a save's manifest and the files it lists, and a training run's ``checkpoints/``
    (``step-N`` directories), ``metrics.jsonl`` and ``logs/``. A missing path and an empty directory
    hold nothing foreign; a path that is not a directory is foreign as a whole.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return [path.name or str(path)]
    if not path.exists():
        return []
    own = {MANIFEST, *RUN_ENTRIES, *_listed_files(path)}
    foreign = []
    for entry in sorted(path.iterdir()):
        if entry.name not in own or entry.is_symlink():
            foreign.append(entry.name)
        elif entry.name == CHECKPOINTS:
            if not entry.is_dir():
                foreign.append(entry.name)
                continue
            foreign += [f"{CHECKPOINTS}/{p.name}" for p in sorted(entry.iterdir())
                        if not (_CHECKPOINT_ENTRY.fullmatch(p.name) and p.is_dir() and not p.is_symlink())]
    return foreign


def _listed_files(directory: Path) -> list[str]:
    """The ``files`` a directory's manifest lists; none when it has no readable manifest."""
    try:
        files = msgspec.json.decode((directory / MANIFEST).read_bytes()).get("files")
    except (OSError, msgspec.DecodeError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []


def save_trainable(model: torch.nn.Module, directory: Path) -> None:
    """The core's default save: every trainable parameter, in one safetensors file."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model)}
    save_file(tensors, directory / WEIGHTS)


def save_new_weights(base: Any, directory: Path) -> None:
    """Write the weights the base checkpoint lacked (``base.new_weights``) as they are now, if there are any.

    A new classification head is initialised at random at every load, so a strategy that leaves it
    frozen would otherwise not reload to the same outputs. They are read from ``base.model``, which
    the strategy may have wrapped.
    """
    from safetensors.torch import save_file

    tensors, lost = {}, []
    for name in getattr(base, "new_weights", None) or []:
        weight = _base_weight(base.model, name)
        if weight is None:
            lost.append(name)
        else:
            tensors[name] = weight.detach().cpu().contiguous()
    if lost:
        warnings.warn(f"the base's newly initialised weight(s) {', '.join(lost)} are gone from the model, so they are "
                      "not saved and a reload initialises them afresh", stacklevel=3)
    if tensors:
        save_file(tensors, directory / NEW_WEIGHTS)


def load_new_weights(model: torch.nn.Module, directory: Path) -> None:
    """Put the saved newly initialised weights into a freshly loaded base ``model``, before a strategy applies."""
    path = directory / NEW_WEIGHTS
    if not path.exists():
        return
    saved = read_safetensors(path)
    params = {n: p for n in saved if (p := _base_weight(model, n)) is not None}
    check_keys(saved, {n: p.shape for n, p in params.items()}, path)
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def _base_weight(model: torch.nn.Module, name: str) -> torch.nn.Parameter | None:
    """The parameter the base model called ``name``, also once PEFT has wrapped its module."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return next((p for n, p in model.named_parameters() if _PEFT_INFIX.sub("", n) == name), None)


def load_trainable(model: torch.nn.Module, directory: Path) -> None:
    """The core's default load: strict, by name; lists missing/unexpected keys and shape mismatches."""
    saved = read_safetensors(directory / WEIGHTS)
    params = dict(trainable_parameters(model))
    check_keys(saved, {n: p.shape for n, p in params.items()}, directory / WEIGHTS)
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


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
    other_base: dict[str, str] | None = None,
) -> Path:
    """Save a trained strategy to ``directory`` atomically; ``base`` is the `BaseModel` it was applied to.

    Nothing saved is ever lost: without ``overwrite`` an existing non-empty directory is refused,
    with it only adapters' own directory is replaced, and only once the new one is complete and on
    disk. The entries named in ``keep`` (a run's checkpoints and logs) move from the old directory
    into the new one. Weights that are not finite are refused before anything is written.
    ``other_base`` (from `check_base`) records that the weights came from a run on another base.
    """
    from .loading import architecture

    directory = check_output_dir(directory, overwrite)
    bad = first_non_finite(trainable_parameters(model))
    if bad:
        kept = " (the previous save is kept)" if (directory / MANIFEST).exists() else ""
        raise AdaptersError(f"{directory}: trainable weight {bad} holds NaN or infinite values, so nothing was saved"
                            f"{kept}. Train again, e.g. with a lower learning rate.")
    name, local = _base_identity(base.name)
    if training and training.get("model") == base.name:
        training = {**training, "model": name}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(directory, "tmp")
    tmp.mkdir()
    try:
        if isinstance(strategy, SavesOwnFormat):
            strategy.save(model, tmp, config)
            name_base(tmp, base.model, name)
        else:
            save_trainable(model, tmp)
        save_new_weights(base, tmp)
        manifest = Manifest(
            format_version=FORMAT_VERSION, strategy=strategy.name, config=dataclasses.asdict(config),
            base_model=name, quantization=base.quantization, task=base.task, labels=base.labels,
            fingerprint=base.fingerprint, shape=architecture(base.model),
            files=sorted(p.name for p in tmp.iterdir()), versions=package_versions(plugin_versions), training=training,
            local=local, other_base=other_base,
        )
        write_json(tmp / MANIFEST, manifest.to_dict())
        replace_dir(tmp, directory, keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _base_identity(name: str) -> tuple[str, dict[str, str] | None]:
    """How a save names its base: a local checkpoint by its folder name, its full path kept apart as local."""
    from .models import MODELS

    path = Path(name).expanduser()
    if name in MODELS or name.startswith("random:") or not path.is_dir():
        return name, None
    path = path.resolve()
    return path.name, {"base_path": str(path)}


@dataclasses.dataclass
class Loaded:
    """A saved strategy restored onto its base model."""

    model: torch.nn.Module
    base: Any  # the BaseModel it was applied to
    strategy: Strategy
    config: Any
    manifest: Manifest
    other_base: dict[str, str] | None = None  # with allow_other_base: the base it was trained on, when it differs


def load(directory: str | Path, base: Any = None, *, device: Any = None, allow_other_base: bool = False) -> Loaded:
    """Restore any saved strategy from ``directory``.

    ``base`` is a model name, a `BaseModel` from `load_base_model`, or None for the base named in the
    manifest. A base whose shapes differ from the saved one is refused; so is one whose weights
    (fingerprint) differ, unless ``allow_other_base``, which loads it with a warning and says so in
    `Loaded.other_base`.
    """
    from .host import get_registry
    from .loading import BaseModel, architecture, load_base_model
    from .options import build_config

    directory = Path(directory)
    manifest = read_manifest(directory)  # also puts back a previous save that a killed save left aside
    strategy = get_registry().get(manifest.strategy)
    try:
        config = build_config(strategy.config_class, manifest.config, strategy.name)
    except AdaptersError as exc:
        raise AdaptersError(f"{directory / MANIFEST}: {exc}") from None
    if not isinstance(base, BaseModel):
        base = load_base_model(base or _saved_base(manifest), manifest.quantization, manifest.task,
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
    other_base = check_base(directory, manifest, base, allow_other_base)
    return Loaded(restore(strategy, base.model, directory, config), base, strategy, config, manifest, other_base)


def check_base(directory: Path, manifest: Manifest, base: Any, allow_other_base: bool = False) -> dict[str, str] | None:
    """Refuse ``base`` when its weights differ from the ones ``directory`` was saved for.

    With ``allow_other_base`` it warns instead, and returns the saved base (name and fingerprint) for
    the next save's manifest to record. A save from 0.1 is checked against 0.1's weak fingerprint,
    with a warning.
    """
    from .loading import base_fingerprint, is_weak_fingerprint

    ours = base_fingerprint(base, manifest.fingerprint)
    if ours != manifest.fingerprint:
        message = (f"{directory}: saved for base {manifest.base_model!r} (fingerprint {manifest.fingerprint}), "
                   f"but {base.name!r} has other weights (fingerprint {ours})")
        if not allow_other_base:
            raise AdaptersError(f"{message}. Load it onto the base it was trained on, or pass --allow-other-base "
                                "(allow_other_base=True) if you mean it.")
        warnings.warn(f"{message}; loaded anyway, as --allow-other-base asks.", OtherBase, stacklevel=3)
        return manifest.other_base or {"base_model": manifest.base_model, "fingerprint": manifest.fingerprint}
    if is_weak_fingerprint(manifest.fingerprint):
        warnings.warn(f"{directory}: saved by adapters 0.1, whose fingerprint checks only the base's config and a "
                      "sample of its embeddings; save it again to record the fingerprint of every weight.",
                      stacklevel=3)
    return manifest.other_base


def _saved_base(manifest: Manifest) -> str:
    """The base to load for a save: a local checkpoint where it was saved from, if it is still there."""
    path = (manifest.local or {}).get("base_path")
    return path if path and Path(path).is_dir() else manifest.base_model


def restore(strategy: Strategy, model: torch.nn.Module, directory: Path, config: Any) -> torch.nn.Module:
    """``strategy`` applied to a fresh base ``model``, with the weights saved in ``directory``."""
    load_new_weights(model, directory)
    if isinstance(strategy, SavesOwnFormat):
        model = strategy.load(model, directory, config)
    else:
        model = strategy.apply(model, config)
        load_trainable(model, directory)
    bad = first_non_finite(trainable_parameters(model))
    if bad:
        raise AdaptersError(f"{directory}: weight {bad} holds NaN or infinite values once loaded. "
                            "Train and save it again.")
    return model
