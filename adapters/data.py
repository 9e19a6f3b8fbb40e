"""Datasets for training: the entry point, readers and splits, from a user's data to `Example`s.

A dataset has one shape, detected from its columns (`SHAPES`, first match wins):

- ``messages``: a chat in the OpenAI/Hugging Face format, a list of ``{"role", "content"}`` objects, rendered with
  the tokenizer's own chat template;
- ``prompt`` and ``completion``: two strings, joined as they are, the completion followed by the EOS token;
- ``instruction``, ``output`` and an optional ``input`` (alpaca): made into a prompt with the Alpaca template
  (`ALPACA_PROMPT`) and a completion;
- ``text``, with a ``label`` for sequence classification: documents, concatenated and cut into blocks for causal LM.

`adapters.batches` turns examples into token tensors. Instruction and chat data train on the completion only (every
assistant turn, for a chat): the other tokens get the label `IGNORE_INDEX`, which the loss skips, unless
``train_on_prompt``. Held-out examples are always masked so, so the held-out loss is the loss on completions. An
example longer than ``--seq-len`` is cut to it from the end; one whose prompt leaves no completion token is left out
with a warning (`adapters.batches.ExamplesSkipped`), and no example left is an error. Each example fills one row,
right-padded (`adapters.batches.padded`), or several fill a row with position ids that restart at each
(`adapters.batches.packed`), which transformers turns into attention that never crosses from one example into
another.

Files: ``.txt`` (one example per paragraph), ``.jsonl``, ``.json`` (an array of objects), ``.csv``, ``.parquet``
and directories written by ``datasets``' ``save_to_disk``; from Python also a ``datasets.Dataset`` or any iterable
of dicts. Parquet, such directories and Dataset objects go through the `datasets` library, the optional extra
``adapters-lab[data]``, imported only for them. The built-in datasets (`adapters.corpora`, ``builtin:NAME``) are real
text shipped with every CPython install, so training works offline and gives the same examples on every run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .contract import TASKS
from .errors import AdaptersError
from .rules import IGNORE_INDEX  # noqa: F401  (where readers of instruction data look for it)

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".json", ".csv", ".parquet")
BUILTIN = "builtin:"

# Fraction of examples kept out of training for evaluation.
HELDOUT_FRACTION = 0.1


# Each shape by the columns that make it, in the order they are detected, so that a file with more columns than one
# shape needs is read as the richest (a chat file with a "text" column is a chat; alpaca files often carry "text").
SHAPES: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}

# The Stanford Alpaca prompts, which alpaca data was written for.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")

# Whether instruction and chat data are packed when the run does not say: what benchmarks/packing.py measured best
# on the built-in instructions (benchmarks/results/packing-cpu-2core.json).
DEFAULT_PACKING = True


class DataError(AdaptersError):
    """The dataset given by the user cannot be read or does not fit the task."""


@dataclass
class Example:
    """One training example: a document (``text``, with a class ``label`` for sequence classification), a
    ``prompt`` and its ``completion``, or a chat's ``messages``."""

    text: str = ""
    label: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, Any]] | None = None
    source: str = field(default="", compare=False, repr=False)  # "FILE:LINE" or "NAME row N", for errors


@dataclass
class Dataset:
    """Examples split into train and held-out parts.

    `labels` holds the sorted label names for sequence classification and is empty for causal-lm. `shape` is
    the key of `SHAPES` the data was read as.
    """

    name: str
    train: list[Example]
    heldout: list[Example]
    labels: list[str]
    shape: str = "text"


# ---------------------------------------------------------------------------
# Public entry points


def load_dataset(source: Any, task: str) -> Dataset:
    """Load the dataset for `task` from `source`: None for the built-in default; a path (see the module's
    docstring) or ``builtin:NAME``; or a ``datasets.Dataset`` / ``DatasetDict`` or an iterable of dicts.

    A ``DatasetDict`` (object or saved directory) trains on its "train" split and holds out its "validation" or
    "test" split; anything else is split by `split`. Raises DataError, naming the file and line or row, when the
    data is missing, malformed, or does not fit the task (e.g. sequence classification without labels).
    """
    _check_task(task)
    if source is None:
        return default_dataset(task)
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if name.startswith(BUILTIN):
            return builtin_dataset(name.removeprefix(BUILTIN), task)
        if _is_description(name) and not os.path.exists(name):
            raise DataError(f"{name}: the run trained on data given in Python, which its records cannot hold; "
                            "pass the same data again (adapters.train(RunSpec(data=...)), or --data FILE)")
        parts = _read_path(Path(name))
    elif _from_datasets(source):
        parts = _dataset_parts(source, None)
    elif isinstance(source, (bytes, Mapping)) or not isinstance(source, Iterable):
        raise DataError(f"data {type(source).__name__}: not a dataset; give a file path, builtin:NAME, "
                        "a datasets.Dataset or an iterable of dicts")
    else:
        parts = _read_object(source)
    return _dataset(parts, task)


def builtin_dataset(name: str, task: str) -> Dataset:
    """A built-in dataset by name (`adapters.corpora.BUILTIN`), checked against `task`."""
    from .corpora import BUILTIN as builtins

    if name not in builtins:
        raise DataError(f"{BUILTIN}{name}: no such built-in dataset; use one of "
                        f"{', '.join(BUILTIN + n for n in builtins)}")
    make, its_task = builtins[name]
    if its_task != task:
        raise DataError(f"{BUILTIN}{name} is {its_task} data, not {task}; choose one for {task} or another --task")
    cached = make()
    # Fresh lists so a caller that shuffles or edits them cannot corrupt the cache.
    return Dataset(cached.name, list(cached.train), list(cached.heldout), list(cached.labels), cached.shape)


def default_dataset(task: str) -> Dataset:
    """Return the built-in dataset for `task`.

    - causal-lm: "python-reference", the Python language reference topics
      from `pydoc_data`, one example per topic.
    - sequence-classification: "stdlib-docstrings", docstrings of public
      standard-library objects labelled by their top-level package.

    Built once per process and cached.
    """
    _check_task(task)
    return builtin_dataset("python-reference" if task == "causal-lm" else "stdlib-docstrings", task)


def read_file(path: str | os.PathLike[str]) -> list[Example]:
    """Read the examples of a file (any of `SUPPORTED_EXTENSIONS`, or a ``save_to_disk`` directory), in order,
    labels kept.

    Raises DataError naming the file (and line or row) for anything unreadable.
    """
    parts = _read_path(Path(path))
    return _examples(parts.rows)[1]


# ---------------------------------------------------------------------------
# Reading rows: files, datasets objects, iterables


@dataclass
class _Row:
    where: str  # "FILE:LINE" or "NAME row N"
    values: Mapping[str, Any]


@dataclass
class _Parts:
    name: str
    rows: list[_Row]
    heldout: list[_Row] | None = None  # a held-out split the data brings (a DatasetDict's "validation" or "test")


def _read_path(path: Path) -> _Parts:
    if path.is_dir():
        return _read_saved(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)}, or a directory written by datasets' save_to_disk"
        )
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path or omit it to use the built-in dataset")
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        # utf-8-sig strips the byte-order mark spreadsheet programs put on CSVs.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason}); re-save the file as UTF-8") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({err.strerror}); check its permissions") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty; add some examples to it")
    parse = {".txt": _parse_txt, ".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv}[suffix]
    return _Parts(str(path), parse(path, text))


def _parse_txt(path: Path, text: str) -> list[_Row]:
    rows: list[_Row] = []
    paragraph: list[str] = []
    start = 0
    # A trailing blank line flushes the last paragraph.
    for line_no, line in enumerate([*text.splitlines(), ""], start=1):
        if line.strip():
            if not paragraph:
                start = line_no
            paragraph.append(line)
        elif paragraph:
            rows.append(_Row(f"{path}:{start}", {"text": "\n".join(paragraph).strip()}))
            paragraph = []
    return rows


def _parse_jsonl(path: Path, text: str) -> list[_Row]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}: malformed JSON ({err.msg}); each line must be one object like "
                '{"text": "..."} or {"messages": [...]}'
            ) from None
        rows.append(_Row(where, _object(obj, where)))
    return rows


def _parse_json(path: Path, text: str) -> list[_Row]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg}); fix it, or write one object a line "
                        "in a .jsonl file") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of objects, not {type(items).__name__}; wrap the "
                        "examples in [...] or write one object a line in a .jsonl file")
    return [_Row(f"{path} row {i}", _object(obj, f"{path} row {i}")) for i, obj in enumerate(items, start=1)]


def _object(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f'{where}: expected an object like {{"text": "..."}} or {{"prompt": "...", '
                        f'"completion": "..."}}, not {type(obj).__name__}')
    return obj


def _parse_csv(path: Path, text: str) -> list[_Row]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    rows = []
    try:
        for row in reader:
            # line_num is the line the record ends on; good enough for quoted
            # multi-line fields and exact for ordinary rows. An empty label cell is no label.
            rows.append(_Row(f"{path}:{reader.line_num}",
                             {k: None if k == "label" and not v else v for k, v in row.items()}))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err}); check the quoting") from None
    return rows


@contextlib.contextmanager
def _datasets_library(what: str) -> Iterator[Any]:
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


def _read_parquet(path: Path) -> _Parts:
    with _datasets_library(str(path)) as datasets, tempfile.TemporaryDirectory() as cache:
        # In memory, with its cache in a directory of its own: nothing is left behind in the user's cache.
        try:
            table = datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
        except Exception as exc:  # pyarrow's errors for a file that is not parquet
            raise DataError(f"{path}: not a readable parquet file ({_first_line(exc)}); check the file") from None
        return _Parts(str(path), _table_rows(table, str(path)))


def _read_saved(path: Path) -> _Parts:
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{path}: a directory, but not one written by datasets' save_to_disk (it has no "
                        "dataset_info.json or dataset_dict.json); pass a data file or such a directory")
    with _datasets_library(str(path)) as datasets:
        try:
            saved = datasets.load_from_disk(str(path), keep_in_memory=True)
        except Exception as exc:
            raise DataError(f"{path}: cannot be read by datasets.load_from_disk ({_first_line(exc)}); save it "
                            "again with save_to_disk") from None
        return _dataset_parts(saved, str(path))


def _from_datasets(source: Any) -> bool:
    """A ``datasets.Dataset`` or ``DatasetDict`` (told apart without importing the library)."""
    return type(source).__module__.split(".")[0] == "datasets" and hasattr(source, "column_names")


def _read_object(source: Iterable[Any]) -> _Parts:
    items = list(source)
    name = f"<{type(source).__name__}: {len(items)} rows>"
    return _Parts(name, [_Row(f"{name} row {i}", _object(obj, f"{name} row {i}"))
                         for i, obj in enumerate(items, start=1)])


def _dataset_parts(data: Any, name: str | None) -> _Parts:
    """Rows of a ``datasets.Dataset``, or of a ``DatasetDict``'s train split with its held-out split; ``name``
    None for an object, named by its kind and size."""
    if not isinstance(data.column_names, dict):  # a Dataset; a DatasetDict maps split names to columns
        name = name or f"<datasets.Dataset: {len(data)} rows>"
        return _Parts(name, _table_rows(data, name))
    splits = list(data)
    train = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
    if train is None:
        raise DataError(f"{name or 'datasets.DatasetDict'}: has the splits {', '.join(splits)} but none named "
                        "train; name the one to train on train")
    held = next((s for s in ("validation", "test") if s in splits), None)
    name = name or f"<datasets.DatasetDict: {len(data[train])} rows>"
    return _Parts(name, _table_rows(data[train], f"{name} {train}"),
                  _table_rows(data[held], f"{name} {held}") if held else None)


def _table_rows(table: Any, name: str) -> list[_Row]:
    return [_Row(f"{name} row {i}", row) for i, row in enumerate(table.to_list(), start=1)]


# ---------------------------------------------------------------------------
# Rows to examples


def _dataset(parts: _Parts, task: str) -> Dataset:
    shape, examples = _examples(parts.rows)
    if parts.heldout is not None:
        if not examples or not parts.heldout:
            raise DataError(f"{parts.name}: its train or held-out split has no examples; add some to it")
        held_shape, heldout = _examples(parts.heldout)
        if held_shape != shape:
            raise DataError(f"{parts.heldout[0].where}: the held-out split is {held_shape} data but the train split "
                            f"is {shape}; give both splits the same columns")
        everything = examples + heldout
    else:
        _check_count(parts.name, examples)
        everything = examples
    if task == "sequence-classification":
        if shape != "text":
            raise DataError(f"{parts.name}: {shape} data trains a causal LM; sequence classification needs "
                            '"text" and "label" columns, or drop --task sequence-classification')
        _check_labels(parts.name, everything)
        labels = sorted({ex.label for ex in everything if ex.label is not None})
    else:
        # Causal LM trains on text alone; drop labels so nothing downstream mistakes them for targets.
        labels = []
        for ex in everything:
            ex.label = None
    if parts.heldout is not None:
        return Dataset(parts.name, examples, heldout, labels, shape)
    train, heldout = split(examples, [f"{i}\0{_key(ex)}" for i, ex in enumerate(examples)])
    return Dataset(parts.name, train, heldout, labels, shape)


def _key(example: Example) -> str:
    if example.messages is not None:
        return json.dumps(example.messages, sort_keys=True)
    if example.prompt is not None:
        return f"{example.prompt}\0{example.completion}"
    return example.text


def _examples(rows: list[_Row]) -> tuple[str, list[Example]]:
    """The rows' shape and their examples; DataError for a row of another shape than the first."""
    shape, first, examples = "text", None, []
    for row in rows:
        this = _shape(row)
        if first is None:
            shape, first = this, row
        elif this != shape:
            raise DataError(f"{row.where}: a {this} example, but {first.where} is {shape}; use one shape for all "
                            "examples (split the file)")
        examples.append(_MAKE[this](row))
    return shape, examples


def _shape(row: _Row) -> str:
    present = {k for k, v in row.values.items() if v is not None}
    for shape, columns in SHAPES.items():
        if all(c in present for c in columns):
            return shape
    for columns in SHAPES.values():
        missing = [c for c in columns if c not in present]
        if len(missing) < len(columns):
            have = ", ".join(f'"{c}"' for c in columns if c in present)
            raise DataError(f'{row.where}: has {have} but no "{missing[0]}"; add it (the shape needs '
                            f"{' and '.join(columns)}), or remove the row")
    found = ", ".join(sorted(map(str, row.values))) or "none"
    raise DataError(f'{row.where}: no "text" column, nor any other this can train on (found: {found}); add a "text" '
                    'column, or "prompt" and "completion", "instruction" and "output", or "messages"')


def _string(row: _Row, key: str, required: bool = True) -> str:
    value = row.values.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f'{row.where}: "{key}" must be a string, not {type(value).__name__} {value!r:.40}')
    if required and not value.strip():
        raise DataError(f'{row.where}: empty "{key}"; fill it in or remove the row')
    return value


def _text_example(row: _Row) -> Example:
    value = row.values["text"]
    if not isinstance(value, str):
        raise DataError(f'{row.where}: expected a string "text" field, not {type(value).__name__}; make it one')
    if not value.strip():
        raise DataError(f"{row.where}: empty text; fill it in or remove the line")
    label = row.values.get("label")
    # bool is a subclass of int, but `true` as a class name is almost
    # certainly a mistake, so only real strings and integers are accepted.
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        raise DataError(f'{row.where}: "label" must be a string or integer, got {label!r}')
    return Example(value, None if label is None else str(label), source=row.where)


def _prompt_completion_example(row: _Row) -> Example:
    return Example(prompt=_string(row, "prompt", required=False), completion=_string(row, "completion"),
                   source=row.where)


def _alpaca_example(row: _Row) -> Example:
    instruction, output = _string(row, "instruction"), _string(row, "output")
    extra = _string(row, "input", required=False)
    prompt = (ALPACA_PROMPT.format(instruction=instruction, input=extra) if extra.strip()
              else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
    return Example(prompt=prompt, completion=output, source=row.where)


def _messages_example(row: _Row) -> Example:
    value = row.values["messages"]
    if not isinstance(value, list) or not value:
        raise DataError(f'{row.where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} '
                        f"objects, not {type(value).__name__} {value!r:.40}")
    messages = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f'{row.where}: message {i} must be an object with a string "role" and a string "content", '
                            f"not {message!r:.60}")
        # Columnar files give every message every key any message has, as None where it had none.
        messages.append({k: v for k, v in message.items() if v is not None})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f'{row.where}: no "assistant" message with content, so nothing to train on; add the '
                        "assistant's reply or remove the row")
    return Example(messages=messages, source=row.where)


_MAKE: dict[str, Callable[[_Row], Example]] = {
    "messages": _messages_example, "prompt-completion": _prompt_completion_example, "alpaca": _alpaca_example,
    "text": _text_example,
}


def _check_count(name: str, examples: list[Example]) -> None:
    if not examples:
        raise DataError(f"{name}: contains no examples; add some to it")
    if len(examples) < 2:
        raise DataError(
            f"{name}: has only 1 example, need at least 2 (one to train on, one to hold out); add more"
        )


def _check_labels(name: str, examples: list[Example]) -> None:
    unlabelled = [ex for ex in examples if ex.label is None]
    if len(unlabelled) == len(examples):
        raise DataError(
            f"{name}: examples have no labels, which sequence-classification needs; "
            'add a "label" field (.jsonl) or column (.csv)'
        )
    if unlabelled:
        raise DataError(f"{unlabelled[0].source}: example has no label but others do; label every example or none")
    distinct = {ex.label for ex in examples}
    if len(distinct) < 2:
        raise DataError(
            f"{name}: only one distinct label ({distinct.pop()!r}); "
            "sequence-classification needs at least 2, so add examples of another class"
        )


# ---------------------------------------------------------------------------
# Splitting and validation


def stable_hash(key: str) -> int:
    # hash() is salted per process; sha256 gives the same split on every run.
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def split(examples: list[Example], keys: list[str]) -> tuple[list[Example], list[Example]]:
    """Split into (train, heldout), holding out about HELDOUT_FRACTION by key hash.

    With at least two examples both parts are non-empty: the lowest-hash
    example is always held out and the highest-hash one always trained on.
    Examples with the same key land on the same side.
    """
    hashes = [stable_hash(key) for key in keys]
    cutoff = int(HELDOUT_FRACTION * 2**64)
    held = [h < cutoff for h in hashes]
    if len(set(hashes)) >= 2:
        lowest, highest = min(hashes), max(hashes)
        held = [h == lowest or (h < cutoff and h != highest) for h in hashes]
    train = [ex for ex, h in zip(examples, held, strict=True) if not h]
    heldout = [ex for ex, h in zip(examples, held, strict=True) if h]
    return train, heldout


def _is_description(name: str) -> bool:
    return name.startswith("<") and name.endswith(">")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
