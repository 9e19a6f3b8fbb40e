"""The entry point: a user's data, by path, name or object, to a checked and split `Dataset`.

`load_dataset` reads a path through the reader registered for its suffix (`adapters.data.readers`), a
``builtin:NAME`` from `adapters.data.corpora`, or rows given in Python; makes the rows into examples
of one shape (`adapters.data.shapes`); checks them against the task; and holds out a split.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..contract import TASKS
from .examples import DataError, Dataset, Example, split
from .formats import dataset_rows
from .readers import Parts, parts_of, read_object, read_path
from .shapes import examples_of

BUILTIN = "builtin:"


def load_dataset(source: Any, task: str) -> Dataset:
    """Load the dataset for `task` from `source`: None for the built-in default; a path (any file a registered
    reader reads, see `adapters.data.formats`) or ``builtin:NAME``; or a ``datasets.Dataset`` / ``DatasetDict`` or
    an iterable of dicts.

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
        parts = read_path(Path(name))
    elif _from_datasets(source):
        rows = len(source) if not isinstance(source.column_names, dict) else sum(len(source[s]) for s in source)
        name = f"<datasets.{type(source).__name__}: {rows} rows>"
        parts = parts_of(name, dataset_rows(source, name))
    elif isinstance(source, (bytes, Mapping)) or not isinstance(source, Iterable):
        raise DataError(f"data {type(source).__name__}: not a dataset; give a file path, builtin:NAME, "
                        "a datasets.Dataset or an iterable of dicts")
    else:
        parts = read_object(source)
    return _dataset(parts, task)


def builtin_dataset(name: str, task: str) -> Dataset:
    """A built-in dataset by name (`adapters.data.corpora.BUILTIN`), checked against `task`."""
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
    """Read the examples of a file (any that a registered reader reads, or a ``save_to_disk`` directory), in
    order, labels kept.

    Raises DataError naming the file (and line or row) for anything unreadable.
    """
    return examples_of(read_path(Path(path)).rows)[1]


def _dataset(parts: Parts, task: str) -> Dataset:
    shape, examples = examples_of(parts.rows)
    if parts.heldout is not None:
        if not examples or not parts.heldout:
            raise DataError(f"{parts.name}: its train or held-out split has no examples; add some to it")
        held_shape, heldout = examples_of(parts.heldout)
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

def _is_description(name: str) -> bool:
    return name.startswith("<") and name.endswith(">")


def _from_datasets(source: Any) -> bool:
    """A ``datasets.Dataset`` or ``DatasetDict`` (told apart without importing the library)."""
    return type(source).__module__.split(".")[0] == "datasets" and hasattr(source, "column_names")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
