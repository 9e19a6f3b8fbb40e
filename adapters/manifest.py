"""The manifest of a saved run (``adapters.json``): a typed model, and its strict reader.

The model is a msgspec ``Struct``: reading decodes and checks the types in one pass, and an error
names the key at fault (``$.config``). Keys that a newer release may add are kept out of the model
and warned about by name; ``trust_remote_code`` and ``auto_map`` are refused wherever they appear.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import msgspec

from .checkpoints import CHECKPOINTS
from .errors import AdaptersError
from .files import recover_dir
from .metrics import METRICS

MANIFEST = "adapters.json"
# What a training run writes into its output beside the save; a save over it keeps them.
RUN_ENTRIES = (CHECKPOINTS, METRICS, "logs")
FORMAT_VERSION = 1
_SECRET_KEYS = ("trust_remote_code", "auto_map")


class Manifest(msgspec.Struct, kw_only=True):
    """What a save records: the strategy and its options, and the base it was trained on."""

    format_version: int
    strategy: str
    config: dict[str, Any]  # the strategy's options, as its config dataclass holds them
    base_model: str
    quantization: str
    task: str
    fingerprint: str  # identifies the base's weights; a load onto other weights is refused
    shape: dict[str, Any]  # the base's architecture numbers (hidden size, layers, ...)
    labels: list[str | int] | None = None  # sequence classification: the labels, in order
    files: list[str] = msgspec.field(default_factory=list)  # the files written beside the manifest
    versions: dict[str, str] = msgspec.field(default_factory=dict)  # packages and plugins
    training: dict[str, Any] | None = None  # the run's settings, for runs saved by `adapters train`
    # Where things were on the machine that saved it (``base_path``: a local base's folder), and only there.
    local: dict[str, str] | None = None
    # Loaded onto a base with other weights on purpose (--allow-other-base): the base it was trained on
    # before, as {"base_model": ..., "fingerprint": ...}.
    other_base: dict[str, str] | None = None

    def __getitem__(self, key: str) -> Any:
        # Dict-style reads, as `Loaded.manifest` offered in 0.1.
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


_REQUIRED = tuple(f.name for f in msgspec.structs.fields(Manifest) if f.required)


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of a saved directory, checked; unknown keys from newer versions are warned about."""
    directory = Path(directory)
    path = directory / MANIFEST
    recover_dir(directory, RUN_ENTRIES)  # a save killed between its two renames left the previous one aside
    if not directory.is_dir():
        raise AdaptersError(f"{directory}: not a directory. Give the --output directory of a training run.")
    if not path.exists():
        raise AdaptersError(
            f"{directory}: no {MANIFEST}; it is not a complete adapters save (an interrupted save never "
            "writes one). Train and save again."
        )
    try:
        raw = msgspec.json.decode(path.read_bytes())
    except msgspec.DecodeError as exc:
        raise AdaptersError(f"{path}: not valid JSON ({exc}). Re-save the directory.") from None
    if not isinstance(raw, dict):
        raise AdaptersError(f"{path}: expected a JSON object. Re-save the directory.")
    if raw.get("kind") == "merged-checkpoint":
        raise AdaptersError(f"{directory}: a merged checkpoint (a plain transformers model), not a run. Load it with "
                            f"transformers, or give it as --model {directory}.")
    _check_raw(raw, path)
    try:
        manifest = msgspec.convert(raw, Manifest)
    except msgspec.ValidationError as exc:
        raise AdaptersError(f"{path}: {exc}. Re-save the directory.") from None
    extra = sorted(set(raw) - set(Manifest.__struct_fields__))
    if extra:
        warnings.warn(f"{path}: ignoring unknown key(s) {', '.join(extra)} (saved by a newer adapters?)", stacklevel=2)
    return manifest


def _check_raw(raw: dict[str, Any], path: Path) -> None:
    """What the types alone do not say: required keys all named at once, the version, secrets."""
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise AdaptersError(f"{path}: missing required key(s) {', '.join(missing)}. Re-save the directory.")
    version = raw["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdaptersError(f"{path}: format_version must be an integer. Re-save the directory.")
    if version > FORMAT_VERSION:
        raise AdaptersError(
            f"{path}: format_version {version} is newer than this adapters supports ({FORMAT_VERSION}). "
            "Upgrade adapters."
        )
    for key in _SECRET_KEYS:
        if key in raw or (isinstance(raw["config"], dict) and key in raw["config"]):
            raise AdaptersError(f"{path}: contains {key!r}, which adapters never honours. Remove it from the file.")
    files = raw.get("files")
    if isinstance(files, list):  # names of entries beside the manifest, never paths out of it
        bad = [f for f in files if isinstance(f, str) and not _plain_name(f)]
        if bad:
            raise AdaptersError(f"{path}: files lists {bad[0]!r}, which is not a plain file name in the directory. "
                                "Re-save the directory.")


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")
