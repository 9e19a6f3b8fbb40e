"""Datasets for training language models: the entry point, file readers, splits, tokenization.

Dependency-light on purpose: only the standard library and torch. The built-in datasets
(`adapters.corpora`) are real text shipped with every CPython install, so training works offline
and gives the same examples on every run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .contract import TASKS
from .errors import AdaptersError

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".csv")

# Fraction of examples kept out of training for evaluation.
HELDOUT_FRACTION = 0.1


class DataError(AdaptersError):
    """The dataset given by the user cannot be read or does not fit the task."""


@dataclass
class Example:
    """One training document, with a class label for sequence classification."""

    text: str
    label: str | None = None


@dataclass
class Dataset:
    """Examples split into train and held-out parts.

    `labels` holds the sorted label names for sequence classification and is
    empty for causal-lm.
    """

    name: str
    train: list[Example]
    heldout: list[Example]
    labels: list[str]


class Tokenizer(Protocol):
    """The small part of a Hugging Face tokenizer that this module uses."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


# ---------------------------------------------------------------------------
# Public entry points


def load_dataset(source: str | os.PathLike[str] | None, task: str) -> Dataset:
    """Load the dataset for `task`: the built-in default when `source` is None,
    otherwise the `.txt`, `.jsonl` or `.csv` file at path `source`.

    Raises DataError when the file is missing, malformed, or does not fit the
    task (e.g. sequence classification without labels).
    """
    _check_task(task)
    if source is None:
        return default_dataset(task)
    name = str(source)
    records = _read_records(Path(source))
    if task == "sequence-classification":
        _check_labels(name, records)
        labels = sorted({r.example.label for r in records if r.example.label is not None})
        examples = [r.example for r in records]
    else:
        # Causal LM trains on text alone; drop labels so nothing downstream
        # mistakes them for targets.
        labels = []
        examples = [Example(r.example.text) for r in records]
    keys = [f"{i}\0{ex.text}" for i, ex in enumerate(examples)]
    train, heldout = split(examples, keys)
    return Dataset(name=name, train=train, heldout=heldout, labels=labels)


def default_dataset(task: str) -> Dataset:
    """Return the built-in dataset for `task`.

    - causal-lm: "python-reference", the Python language reference topics
      from `pydoc_data`, one example per topic.
    - sequence-classification: "stdlib-docstrings", docstrings of public
      standard-library objects labelled by their top-level package.

    Built once per process and cached.
    """
    from .corpora import python_reference, stdlib_docstrings

    _check_task(task)
    cached = python_reference() if task == "causal-lm" else stdlib_docstrings()
    # Fresh lists so a caller that shuffles or edits them cannot corrupt the cache.
    return Dataset(cached.name, list(cached.train), list(cached.heldout), list(cached.labels))


def read_file(path: str | os.PathLike[str]) -> list[Example]:
    """Read examples from a `.txt`, `.jsonl` or `.csv` file.

    - `.txt`: one unlabelled example per blank-line separated paragraph.
    - `.jsonl`: one JSON object per line with a string `text` and an optional
      `label` (string or integer); blank lines are skipped.
    - `.csv`: a header row with a `text` column and an optional `label` column.

    Raises DataError naming the file (and line) for anything unreadable.
    """
    return [r.example for r in _read_records(Path(path))]


# ---------------------------------------------------------------------------
# Tokenization helpers


def causal_lm_blocks(texts: Sequence[str], tokenizer: Tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize `texts` into a [n_blocks, seq_len] LongTensor for causal LM training.

    Texts are concatenated, each followed by the EOS token when the tokenizer
    has one (so the model learns where documents end), and cut into
    consecutive blocks; the remainder shorter than a block is dropped.
    """
    _check_seq_len(seq_len)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if eos is not None:
            ids.append(eos)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise DataError(
            f"the data has {len(ids)} tokens, fewer than --seq-len {seq_len}; "
            f"pass a smaller --seq-len (at most {len(ids)}) or use more text"
        )
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def classification_batch_tensors(
    examples: Sequence[Example], labels: Sequence[str], tokenizer: Tokenizer, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize labelled examples into (input_ids, attention_mask, label_ids).

    Each text is truncated to `seq_len` tokens and right-padded with the
    tokenizer's pad token (falling back to EOS, then 0); the attention mask is
    1 on real tokens. `label_ids` indexes into `labels`.
    """
    _check_seq_len(seq_len)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        pad = 0
    label_index = {name: i for i, name in enumerate(labels)}
    n = len(examples)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.long)
    label_ids = torch.empty(n, dtype=torch.long)
    for row, ex in enumerate(examples):
        if ex.label not in label_index:
            known = ", ".join(labels) or "none"
            raise DataError(
                f"example {row} has label {ex.label!r}, which is not one of the "
                f"dataset's labels ({known}); relabel it or add the label to the training data"
            )
        ids = tokenizer.encode(ex.text, add_special_tokens=False)[:seq_len]
        if not ids:
            # An all-padding row has nothing to pool over and would give a
            # meaningless (or NaN) prediction, so refuse it up front.
            raise DataError(f"example {row} ({ex.text[:40]!r}) encodes to no tokens; remove it from the data")
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        label_ids[row] = label_index[ex.label]
    return input_ids, attention_mask, label_ids


# ---------------------------------------------------------------------------
# File reading


@dataclass
class _Record:
    """An example plus the 1-based line it starts on, for error messages."""

    line: int
    example: Example


def _read_records(path: Path) -> list[_Record]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path or omit it to use the built-in dataset")
    try:
        # utf-8-sig strips the byte-order mark spreadsheet programs put on CSVs.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason}); re-save the file as UTF-8") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({err.strerror}); check its permissions") from None

    if not text.strip():
        raise DataError(f"{path}: file is empty; add some examples to it")
    if suffix == ".txt":
        records = _parse_txt(text)
    elif suffix == ".jsonl":
        records = _parse_jsonl(path, text)
    else:
        records = _parse_csv(path, text)

    if not records:
        raise DataError(f"{path}: contains no examples; add some text to it")
    if len(records) < 2:
        raise DataError(
            f"{path}: has only 1 example, need at least 2 (one to train on, one to hold out); add more"
        )
    return records


def _parse_txt(text: str) -> list[_Record]:
    records: list[_Record] = []
    paragraph: list[str] = []
    start = 0
    # A trailing blank line flushes the last paragraph.
    for line_no, line in enumerate([*text.splitlines(), ""], start=1):
        if line.strip():
            if not paragraph:
                start = line_no
            paragraph.append(line)
        elif paragraph:
            records.append(_Record(start, Example("\n".join(paragraph).strip())))
            paragraph = []
    return records


def _parse_jsonl(path: Path, text: str) -> list[_Record]:
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}: malformed JSON ({err.msg}); each line must be one object like "
                '{"text": "...", "label": "..."}'
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f'{where}: expected an object with a string "text" field; add one')
        label = obj.get("label")
        # bool is a subclass of int, but `true` as a class name is almost
        # certainly a mistake, so only real strings and integers are accepted.
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            raise DataError(f'{where}: "label" must be a string or integer, got {label!r}')
        records.append(_make_record(where, line_no, obj["text"], label))
    return records


def _parse_csv(path: Path, text: str) -> list[_Record]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    fields = reader.fieldnames or []
    if "text" not in fields:
        found = ", ".join(fields) or "none"
        raise DataError(
            f'{path}: no "text" column in the header (found: {found}); add a header row with "text"'
        )
    records = []
    try:
        for row in reader:
            # line_num is the line the record ends on; good enough for quoted
            # multi-line fields and exact for ordinary rows.
            line_no = reader.line_num
            text_value = row.get("text") or ""
            label = row.get("label") or None
            records.append(_make_record(f"{path}:{line_no}", line_no, text_value, label))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err}); check the quoting") from None
    return records


def _make_record(where: str, line_no: int, text: str, label: str | int | None) -> _Record:
    if not text.strip():
        raise DataError(f"{where}: empty text; fill it in or remove the line")
    return _Record(line_no, Example(text, None if label is None else str(label)))


def _check_labels(name: str, records: list[_Record]) -> None:
    unlabelled = [r for r in records if r.example.label is None]
    if len(unlabelled) == len(records):
        raise DataError(
            f"{name}: examples have no labels, which sequence-classification needs; "
            'add a "label" field (.jsonl) or column (.csv)'
        )
    if unlabelled:
        raise DataError(
            f"{name}:{unlabelled[0].line}: example has no label but others do; label every example or none"
        )
    distinct = {r.example.label for r in records}
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
    """
    hashes = [stable_hash(key) for key in keys]
    cutoff = int(HELDOUT_FRACTION * 2**64)
    held = [h < cutoff for h in hashes]
    if len(examples) >= 2:
        held[min(range(len(hashes)), key=hashes.__getitem__)] = True
        held[max(range(len(hashes)), key=hashes.__getitem__)] = False
    train = [ex for ex, h in zip(examples, held, strict=True) if not h]
    heldout = [ex for ex, h in zip(examples, held, strict=True) if h]
    return train, heldout


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise DataError(f"--seq-len must be at least 1, got {seq_len}")
