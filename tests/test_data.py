"""Tests for adapters.data: built-in datasets, file readers and tokenization helpers."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from adapters.data import (
    TASKS,
    DataError,
    Dataset,
    Example,
    causal_lm_blocks,
    classification_batch_tensors,
    default_dataset,
    load_dataset,
    read_file,
)
from adapters.errors import AdaptersError


class ByteTokenizer:
    """Byte-level stand-in for a Hugging Face tokenizer: token id = byte value."""

    def __init__(self, eos_token_id: int | None = 256, pad_token_id: int | None = None):
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False  # the helpers must not add BOS/EOS themselves
        return list(text.encode("utf-8"))


def write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def texts(examples: list[Example]) -> list[str]:
    return [ex.text for ex in examples]


# ---------------------------------------------------------------------------
# Built-in datasets


def test_tasks() -> None:
    assert TASKS == ("causal-lm", "sequence-classification")


def test_python_reference_is_real_and_split_by_topic() -> None:
    from pydoc_data.topics import topics

    ds = load_dataset(None, "causal-lm")
    assert ds.name == "python-reference"
    assert ds.labels == []
    assert len(ds.train) + len(ds.heldout) == len(topics)
    assert 1 <= len(ds.heldout) <= len(topics) // 4
    assert set(texts(ds.train)).isdisjoint(texts(ds.heldout))
    assert all(ex.label is None and ex.text for ex in ds.train + ds.heldout)
    # Real reference prose, not placeholder text.
    assert any("The ``if`` statement" in t or 'The "if" statement' in t for t in texts(ds.train + ds.heldout))
    assert sum(len(t) for t in texts(ds.train)) > 100_000


def test_stdlib_docstrings_is_real_balanced_and_disjoint() -> None:
    ds = default_dataset("sequence-classification")
    assert ds.name == "stdlib-docstrings"
    assert len(ds.labels) >= 4 and ds.labels == sorted(ds.labels)
    examples = ds.train + ds.heldout
    assert set(ex.label for ex in examples) == set(ds.labels)
    counts = Counter(ex.label for ex in examples)
    assert min(counts.values()) >= 50
    assert max(counts.values()) <= 3 * min(counts.values())
    assert all(len(ex.text) >= 40 for ex in examples)
    assert len(set(texts(examples))) == len(examples)  # deduplicated
    assert set(texts(ds.train)).isdisjoint(texts(ds.heldout))
    assert 0.03 < len(ds.heldout) / len(examples) < 0.2
    assert set(ex.label for ex in ds.heldout) == set(ds.labels)


def test_default_split_is_deterministic_and_copies() -> None:
    for task in TASKS:
        a, b = default_dataset(task), default_dataset(task)
        assert a == b
        a.train.clear()  # mutating one result must not corrupt the cache
        assert default_dataset(task).train == b.train


def test_stdlib_docstrings_same_in_fresh_process() -> None:
    # The split must not depend on hash() salting or import order, so build it
    # in a new interpreter and compare.
    import subprocess
    import sys

    code = (
        "import json, sys; from adapters.data import default_dataset as d; "
        "ds = d('sequence-classification'); "
        "json.dump([[e.text, e.label] for e in ds.heldout], sys.stdout)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    here = [[e.text, e.label] for e in default_dataset("sequence-classification").heldout]
    assert json.loads(out) == here


def test_defaults_build_quickly() -> None:
    from adapters.corpora import python_reference, stdlib_docstrings

    python_reference.cache_clear()
    stdlib_docstrings.cache_clear()
    start = time.perf_counter()
    default_dataset("causal-lm")
    default_dataset("sequence-classification")
    assert time.perf_counter() - start < 3.0


def test_unknown_task() -> None:
    with pytest.raises(DataError, match="causal-lm, sequence-classification"):
        load_dataset(None, "translation")


# ---------------------------------------------------------------------------
# File formats


def test_txt_paragraphs(tmp_path: Path) -> None:
    path = write(tmp_path, "a.txt", "\nFirst para\nline two.\n\n  \nSecond.\n\n\n\nThird\n")
    assert read_file(path) == [Example("First para\nline two."), Example("Second."), Example("Third")]
    ds = load_dataset(str(path), "causal-lm")
    assert ds.name == str(path)
    assert ds.labels == []
    assert sorted(texts(ds.train + ds.heldout)) == ["First para\nline two.", "Second.", "Third"]


def test_jsonl_with_labels(tmp_path: Path) -> None:
    rows = [{"text": f"example {i}", "label": ["pos", "neg"][i % 2]} for i in range(20)]
    content = jsonl(rows[:10]) + "\n   \n" + jsonl(rows[10:])  # blank lines are skipped
    path = write(tmp_path, "d.jsonl", content)
    assert read_file(path) == [Example(r["text"], r["label"]) for r in rows]
    ds = load_dataset(path, "sequence-classification")
    assert ds.labels == ["neg", "pos"]
    assert len(ds.train) + len(ds.heldout) == 20
    assert ds.train and ds.heldout


def test_jsonl_int_labels_become_strings(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl([{"text": "a", "label": 0}, {"text": "b", "label": 1}]))
    assert read_file(path) == [Example("a", "0"), Example("b", "1")]
    assert load_dataset(path, "sequence-classification").labels == ["0", "1"]


def test_jsonl_labels_ignored_for_causal_lm(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl([{"text": "a", "label": "x"}, {"text": "b"}]))
    ds = load_dataset(path, "causal-lm")
    assert ds.labels == []
    assert all(ex.label is None for ex in ds.train + ds.heldout)


def test_csv(tmp_path: Path) -> None:
    content = 'id,text,label\n1,"hello, world",greet\n2,"multi\nline",other\n3,bye,greet\n'
    path = write(tmp_path, "d.csv", content)
    assert read_file(path) == [
        Example("hello, world", "greet"),
        Example("multi\nline", "other"),
        Example("bye", "greet"),
    ]
    assert load_dataset(path, "sequence-classification").labels == ["greet", "other"]


def test_csv_without_label_column(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "text\none\ntwo\n")
    assert read_file(path) == [Example("one"), Example("two")]


def test_file_split_deterministic_and_nonempty(tmp_path: Path) -> None:
    rows = [{"text": f"document number {i}"} for i in range(200)]
    path = write(tmp_path, "d.jsonl", jsonl(rows))
    a = load_dataset(path, "causal-lm")
    b = load_dataset(path, "causal-lm")
    assert a == b
    assert 5 <= len(a.heldout) <= 40
    assert set(texts(a.train)).isdisjoint(texts(a.heldout))
    # Two examples: always one of each.
    two = write(tmp_path, "two.txt", "alpha\n\nbeta\n")
    ds = load_dataset(two, "causal-lm")
    assert len(ds.train) == 1 and len(ds.heldout) == 1


# ---------------------------------------------------------------------------
# Errors: every one is a DataError (hence an AdaptersError) naming the file.


def assert_data_error(path: Path, task: str, *fragments: str) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(str(path), task)
    message = str(info.value)
    assert isinstance(info.value, AdaptersError)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path: Path) -> None:
    assert_data_error(tmp_path / "nope.jsonl", "causal-lm", "not found")


def test_unsupported_extension(tmp_path: Path) -> None:
    path = write(tmp_path, "d.parquet", "x")
    assert_data_error(path, "causal-lm", ".txt", ".jsonl", ".csv")


@pytest.mark.parametrize("name", ["e.txt", "e.jsonl", "e.csv"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    assert_data_error(write(tmp_path, name, "\n  \n"), "causal-lm", "empty")


def test_csv_header_only_has_no_examples(tmp_path: Path) -> None:
    assert_data_error(write(tmp_path, "h.csv", "text,label\n"), "causal-lm", "no examples")


def test_malformed_json_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    assert_data_error(path, "causal-lm", f"{path}:3", "JSON")


@pytest.mark.parametrize("line", ['{"label": "x"}', '{"text": 5}', '["text"]'])
def test_jsonl_without_string_text(tmp_path: Path, line: str) -> None:
    path = write(tmp_path, "d.jsonl", '{"text": "ok"}\n' + line + "\n")
    assert_data_error(path, "causal-lm", f"{path}:2", '"text"')


def test_csv_without_text_column(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "body,label\nhi,x\nyo,y\n")
    assert_data_error(path, "causal-lm", '"text" column', "body")


def test_classification_without_labels(tmp_path: Path) -> None:
    path = write(tmp_path, "d.txt", "one\n\ntwo\n")
    assert_data_error(path, "sequence-classification", "no labels")


def test_classification_single_label(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]))
    assert_data_error(path, "sequence-classification", "at least 2", "'x'")


def test_classification_mixed_labels_names_line(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c"}]
    path = write(tmp_path, "d.jsonl", jsonl(rows))
    assert_data_error(path, "sequence-classification", f"{path}:3", "no label")


def test_too_few_examples(tmp_path: Path) -> None:
    assert_data_error(write(tmp_path, "one.txt", "just one paragraph\n"), "causal-lm", "at least 2")


# ---------------------------------------------------------------------------
# Tokenization helpers


def test_causal_lm_blocks_concatenates_with_eos() -> None:
    blocks = causal_lm_blocks(["ab", "cde"], ByteTokenizer(eos_token_id=0), seq_len=3)
    # a b EOS c d e EOS -> 7 tokens -> 2 blocks of 3, remainder dropped.
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[97, 98, 0], [99, 100, 101]]


def test_causal_lm_blocks_without_eos() -> None:
    blocks = causal_lm_blocks(["ab", "cd"], ByteTokenizer(eos_token_id=None), seq_len=2)
    assert blocks.tolist() == [[97, 98], [99, 100]]


def test_causal_lm_blocks_too_few_tokens() -> None:
    with pytest.raises(DataError, match=r"has 3 tokens, fewer than --seq-len 8") as info:
        causal_lm_blocks(["ab"], ByteTokenizer(), seq_len=8)
    assert "smaller --seq-len" in str(info.value)


def test_causal_lm_blocks_on_default_dataset() -> None:
    ds = default_dataset("causal-lm")
    blocks = causal_lm_blocks(texts(ds.heldout), ByteTokenizer(), seq_len=128)
    assert blocks.ndim == 2 and blocks.shape[1] == 128 and blocks.shape[0] > 10


def test_classification_tensors_pad_mask_labels() -> None:
    examples = [Example("abcdef", "neg"), Example("xy", "pos"), Example("q", "neg")]
    ids, mask, labels = classification_batch_tensors(
        examples, ["neg", "pos"], ByteTokenizer(eos_token_id=0, pad_token_id=7), seq_len=4
    )
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    assert ids.tolist() == [[97, 98, 99, 100], [120, 121, 7, 7], [113, 7, 7, 7]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert labels.tolist() == [0, 1, 0]


@pytest.mark.parametrize(("eos", "expected_pad"), [(5, 5), (None, 0)])
def test_classification_pad_fallback(eos: int | None, expected_pad: int) -> None:
    ids, _, _ = classification_batch_tensors(
        [Example("a", "x")], ["x"], ByteTokenizer(eos_token_id=eos, pad_token_id=None), seq_len=3
    )
    assert ids.tolist() == [[97, expected_pad, expected_pad]]


def test_classification_unknown_label() -> None:
    with pytest.raises(DataError, match="'maybe'"):
        classification_batch_tensors([Example("a", "maybe")], ["neg", "pos"], ByteTokenizer(), 4)


def test_classification_tensors_on_default_dataset() -> None:
    ds = default_dataset("sequence-classification")
    ids, mask, labels = classification_batch_tensors(ds.heldout, ds.labels, ByteTokenizer(), 64)
    n = len(ds.heldout)
    assert ids.shape == mask.shape == (n, 64)
    assert labels.shape == (n,)
    assert int(labels.max()) < len(ds.labels)
    assert bool((mask.sum(dim=1) > 0).all())


def test_dataset_type() -> None:
    assert isinstance(default_dataset("causal-lm"), Dataset)
