"""The built-in data readers, registered as a plugin's are: text, JSON lines, JSON, CSV, parquet and
directories written by ``datasets``' ``save_to_disk``.

This module is one of the plugin manager's `DEFAULT_PLUGINS`; a plugin adds a reader the same way
(``register_data_readers``, docs/plugins.md). Each reader turns a path into ``(location, row)``
pairs:

- ``.txt``: one example per paragraph (blank lines between), as ``text``;
- ``.jsonl``: one object a line; ``.json``: an array of objects;
- ``.csv``: a header row naming the columns; an empty ``label`` cell is no label;
- ``.parquet`` and ``save_to_disk`` directories (a ``DatasetDict`` gives its splits): through the
  `datasets` library, the optional extra ``adapters-lab[data]``, imported only for them.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..host import hookimpl
from .examples import DataError

Pairs = list[tuple[str, Any]]  # (location, row) as a reader returns them


def _text(path: Path) -> str:
    """The file's text; DataError for a file that is not UTF-8, cannot be read, or is empty."""
    try:
        # utf-8-sig strips the byte-order mark spreadsheet programs put on CSVs.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason}); re-save the file as UTF-8") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({err.strerror}); check its permissions") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty; add some examples to it")
    return text


def read_txt(path: Path) -> Pairs:
    rows: Pairs = []
    paragraph: list[str] = []
    start = 0
    # A trailing blank line flushes the last paragraph.
    for line_no, line in enumerate([*_text(path).splitlines(), ""], start=1):
        if line.strip():
            if not paragraph:
                start = line_no
            paragraph.append(line)
        elif paragraph:
            rows.append((f"{path}:{start}", {"text": "\n".join(paragraph).strip()}))
            paragraph = []
    return rows


def read_jsonl(path: Path) -> Pairs:
    rows = []
    for line_no, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            rows.append((where, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}: malformed JSON ({err.msg}); each line must be one object like "
                '{"text": "..."} or {"messages": [...]}'
            ) from None
    return rows


def read_json(path: Path) -> Pairs:
    try:
        items = json.loads(_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg}); fix it, or write one object a line "
                        "in a .jsonl file") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of objects, not {type(items).__name__}; wrap the "
                        "examples in [...] or write one object a line in a .jsonl file")
    return [(f"{path} row {i}", obj) for i, obj in enumerate(items, start=1)]


def read_csv(path: Path) -> Pairs:
    reader = csv.DictReader(_text(path).splitlines(keepends=True))
    rows = []
    try:
        for row in reader:
            # line_num is the line the record ends on; good enough for quoted
            # multi-line fields and exact for ordinary rows. An empty label cell is no label.
            rows.append((f"{path}:{reader.line_num}", {k: None if k == "label" and not v else v
                                                       for k, v in row.items()}))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err}); check the quoting") from None
    return rows


@contextlib.contextmanager
def datasets_library(what: str) -> Iterator[Any]:
    """The `datasets` module, quiet (no progress bars; its log of an error we report ourselves is left out), or
    DataError naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what}: reading it needs the `datasets` library, which is not installed; install it with "
                        "pip install 'adapters-lab[data]'") from None
    shown = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield datasets
    finally:
        logger.setLevel(level)
        if shown:
            datasets.enable_progress_bars()


def read_parquet(path: Path) -> Pairs:
    with datasets_library(str(path)) as datasets, tempfile.TemporaryDirectory() as cache:
        # In memory, with its cache in a directory of its own: nothing is left behind in the user's cache.
        try:
            table = datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
        except Exception as exc:  # pyarrow's errors for a file that is not parquet
            raise DataError(f"{path}: not a readable parquet file ({_first_line(exc)}); check the file") from None
        return table_rows(table, str(path))


def read_saved(path: Path) -> Pairs | dict[str, Pairs]:
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{path}: a directory, but not one written by datasets' save_to_disk (it has no "
                        "dataset_info.json or dataset_dict.json); pass a data file or such a directory")
    with datasets_library(str(path)) as datasets:
        try:
            saved = datasets.load_from_disk(str(path), keep_in_memory=True)
        except Exception as exc:
            raise DataError(f"{path}: cannot be read by datasets.load_from_disk ({_first_line(exc)}); save it "
                            "again with save_to_disk") from None
        return dataset_rows(saved, str(path))


def dataset_rows(data: Any, name: str) -> Pairs | dict[str, Pairs]:
    """The pairs of a ``datasets.Dataset``, or of each split of a ``DatasetDict`` by split name."""
    if not isinstance(data.column_names, dict):  # a Dataset; a DatasetDict maps split names to columns
        return table_rows(data, name)
    return {split: table_rows(data[split], f"{name} {split}") for split in data}


def table_rows(table: Any, name: str) -> Pairs:
    return [(f"{name} row {i}", row) for i, row in enumerate(table.to_list(), start=1)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@hookimpl
def register_data_readers(register):
    register("text", read_txt, suffixes=".txt", description="one example per paragraph")
    register("jsonl", read_jsonl, suffixes=".jsonl", description="one JSON object a line")
    register("json", read_json, suffixes=".json", description="a JSON array of objects")
    register("csv", read_csv, suffixes=".csv", description="a header row naming the columns")
    register("parquet", read_parquet, suffixes=".parquet", description="a parquet table")
    register("save-to-disk", read_saved, suffixes="/",
             description="a directory written by datasets' save_to_disk")
