"""Data to rows: a path through the reader registered for its suffix, or an object given in Python.

Readers are registered through the ``register_data_readers`` hook and found with
`adapters.host.get_readers`: the built-in ones (`adapters.data.formats`) and any a plugin adds, under
the same rules (a built-in keeps its suffixes). A reader returns ``(location, row)`` pairs, or a
dict of such lists by split name; `parts_of` checks them and picks the splits: ``train`` is
trained on, ``validation`` or ``test`` held out.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..host import Format, get_readers, guarded
from .examples import DataError
from .shapes import Row, as_row


@dataclass
class Parts:
    """The rows of one dataset, as read."""

    name: str
    rows: list[Row]
    heldout: list[Row] | None = None  # a held-out split the data brings (a DatasetDict's "validation" or "test")


def read_path(path: Path) -> Parts:
    """The rows of the file or directory at ``path``, read by the reader registered for its suffix.

    DataError names the path: no reader for it (listing the suffixes there are), not found, or what
    its reader could not read. A third-party reader that fails otherwise is named in the error.
    """
    readers = get_readers()
    is_dir = path.is_dir()
    reader = readers.for_path(path.name, is_dir=is_dir)
    if reader is None:
        directory = readers.for_path(str(path), is_dir=True)
        also = f", or {directory.description or 'a directory'}" if directory else ""
        what = "a directory, which no reader reads" if is_dir else \
            f"unsupported file type {path.suffix.lower() or '(no extension)'!r}"
        raise DataError(f"{path}: {what}; use one of {', '.join(readers.suffixes())}{also} (plugins add "
                        "readers of other files)")
    if not is_dir and not path.is_file():
        raise DataError(f"{path}: file not found; check the path or omit it to use the built-in dataset")
    return guarded(reader.plugin, lambda: parts_of(str(path), reader.function(path), reader),
                   lambda error: DataError(f"{path}: the {reader.name!r} reader of plugin {reader.plugin!r} "
                                           f"failed: {error}; check the file, or fix or uninstall the plugin"))


def read_object(source: Iterable[Any]) -> Parts:
    """The rows of an iterable of dicts, named by its kind and size ("<list: 12 rows>")."""
    items = list(source)
    name = f"<{type(source).__name__}: {len(items)} rows>"
    return Parts(name, [as_row(f"{name} row {i}", obj) for i, obj in enumerate(items, start=1)])


def parts_of(name: str, result: Any, reader: Format | None = None) -> Parts:
    """What a reader returned (pairs, or a dict of them by split), checked, as the `Parts` of ``name``."""
    if not isinstance(result, Mapping):
        return Parts(name, _rows(name, result, reader))
    splits = list(result)
    train = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
    if train is None:
        raise DataError(f"{name}: has the splits {', '.join(map(str, splits))} but none named train; name the one "
                        "to train on train")
    held = next((s for s in ("validation", "test") if s in splits), None)
    return Parts(name, _rows(name, result[train], reader), _rows(name, result[held], reader) if held else None)


def _rows(name: str, pairs: Iterable[Any], reader: Format | None) -> list[Row]:
    rows = []
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            by = f"the {reader.name!r} reader of plugin {reader.plugin!r}" if reader else "the data"
            raise DataError(f"{name}: {by} gave {pair!r:.60} where a (location, row) pair belongs; a reader "
                            "returns such pairs (docs/plugins.md)")
        rows.append(as_row(*pair))
    return rows
