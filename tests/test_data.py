"""Tests for adapters.data: built-in datasets, file readers and tokenization helpers."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from adapters.batches import causal_lm_blocks, classification_batch_tensors
from adapters.data import (
    TASKS,
    DataError,
    Dataset,
    Example,
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
    from adapters.data.corpora import python_reference, stdlib_docstrings

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
    path = write(tmp_path, "d.xlsx", "x")
    assert_data_error(path, "causal-lm", ".txt", ".jsonl", ".json", ".csv", ".parquet", "save_to_disk")


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


# ---------------------------------------------------------------------------
# Instruction and chat data: shapes, containers, masking, packing


from adapters.batches import ExamplesSkipped, example_tokens, instruction_rows, packed, padded  # noqa: E402
from adapters.data import ALPACA_PROMPT  # noqa: E402
from adapters.rules import IGNORE_INDEX  # noqa: E402

PC_ROWS = [{"prompt": f"Q{i}: ", "completion": f"answer {i}"} for i in range(12)]


def write_rows(tmp_path: Path, container: str, rows: list[dict]):
    """``rows`` in ``container``: a path for files and save_to_disk directories, else the object itself."""
    import datasets

    if container == "jsonl":
        return write(tmp_path, "d.jsonl", jsonl(rows))
    if container == "json":
        return write(tmp_path, "d.json", json.dumps(rows, indent=2))
    if container == "csv":
        import csv

        path = tmp_path / "d.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path
    table = datasets.Dataset.from_list(rows)
    if container == "parquet":
        table.to_parquet(str(tmp_path / "d.parquet"))
        return tmp_path / "d.parquet"
    if container == "saved":
        table.save_to_disk(str(tmp_path / "saved"))
        return tmp_path / "saved"
    if container == "dataset":
        return table
    assert container == "iterable"
    return (dict(row) for row in rows)  # a generator: read once


@pytest.mark.parametrize("container", ["jsonl", "json", "csv", "parquet", "saved", "dataset", "iterable"])
def test_prompt_completion_loads_from_every_container(tmp_path: Path, container: str) -> None:
    ds = load_dataset(write_rows(tmp_path, container, PC_ROWS), "causal-lm")
    assert ds.shape == "prompt-completion"
    got = sorted((ex.prompt, ex.completion) for ex in ds.train + ds.heldout)
    assert got == sorted((r["prompt"], r["completion"]) for r in PC_ROWS)
    assert ds.train and ds.heldout
    if container in ("dataset", "iterable"):
        assert ds.name.startswith("<") and "12 rows" in ds.name


CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]


@pytest.mark.parametrize(("row", "shape"), [
    ({"messages": CHAT, "text": "ignored"}, "messages"),  # the richest shape wins
    ({"prompt": "p", "completion": "c"}, "prompt-completion"),
    ({"instruction": "Add.", "input": "1 2", "output": "3", "text": "x"}, "alpaca"),
    ({"text": "plain"}, "text"),
])
def test_shape_detected_from_columns(tmp_path: Path, row: dict, shape: str) -> None:
    ds = load_dataset(write(tmp_path, "d.jsonl", jsonl([row, row])), "causal-lm")
    assert ds.shape == shape


def test_messages_from_parquet_drop_the_keys_other_messages_had(tmp_path: Path) -> None:
    # Arrow gives every message the keys any message has (here "name"), as None.
    chat = [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Yo"}]
    ds = load_dataset(write_rows(tmp_path, "parquet", [{"messages": chat}] * 3), "causal-lm")
    assert ds.train[0].messages == chat


def test_dataset_dict_holds_out_its_validation_split(tmp_path: Path) -> None:
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(PC_ROWS[:9]),
                                   "validation": datasets.Dataset.from_list(PC_ROWS[9:])})
    splits.save_to_disk(str(tmp_path / "dd"))
    for source in (tmp_path / "dd", splits):
        ds = load_dataset(source, "causal-lm")
        assert [ex.completion for ex in ds.train] == [r["completion"] for r in PC_ROWS[:9]]
        assert [ex.completion for ex in ds.heldout] == [r["completion"] for r in PC_ROWS[9:]]


def test_prompt_completion_labels_mask_the_prompt() -> None:
    tok = ByteTokenizer(eos_token_id=0)
    ex = Example(prompt="ab", completion="cd")
    ids, labels = example_tokens(ex, tok)
    assert ids == [97, 98, 99, 100, 0]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, 99, 100, 0]  # the completion and its EOS are trained
    assert example_tokens(ex, tok, train_on_prompt=True) == (ids, ids)


def test_alpaca_prompt_is_masked(tmp_path: Path) -> None:
    rows = [{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Say hi.", "output": "hi"}]
    examples = read_file(write(tmp_path, "a.jsonl", jsonl(rows)))
    assert examples[0].prompt == ALPACA_PROMPT.format(instruction="Add.", input="1 2")
    assert "### Input" not in examples[1].prompt and examples[1].prompt.endswith("### Response:\n")
    ids, labels = example_tokens(examples[0], ByteTokenizer(eos_token_id=0))
    n = len(examples[0].prompt.encode())
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] == [ord("3"), 0]


def test_messages_train_every_assistant_turn_with_the_models_template(smollm2) -> None:
    tok = smollm2.tokenizer
    ids, labels = example_tokens(Example(messages=CHAT), tok)
    assert ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in trained)
    # Two runs of trained tokens: each assistant reply with its end of turn, nothing else.
    runs = [[trained[0]]]
    for i in trained[1:]:
        runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i])
    assert [tok.decode([ids[i] for i in run]) for run in runs] == ["Hello!<|im_end|>\n", "A2<|im_end|>\n"]
    assert example_tokens(Example(messages=CHAT), tok, train_on_prompt=True) == (ids, ids)


def test_messages_need_a_chat_template() -> None:
    with pytest.raises(DataError, match=r"d.jsonl:4: chat messages .* has none; use prompt/completion"):
        example_tokens(Example(messages=CHAT, source="d.jsonl:4"), ByteTokenizer())


def test_role_order_the_template_refuses(smollm2) -> None:
    import copy

    tok = copy.deepcopy(smollm2.tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    ok = Example(messages=CHAT, source="c.jsonl:1")
    assert example_tokens(ok, tok)[0]
    bad = Example(messages=[CHAT[1], CHAT[0], CHAT[1]], source="c.jsonl:2")
    with pytest.raises(DataError, match=r"c.jsonl:2: .*refuses this chat \(roles: assistant.*must alternate"):
        example_tokens(bad, tok)


def test_long_prompts_are_skipped_with_a_count_and_none_left_is_an_error() -> None:
    tok = ByteTokenizer(eos_token_id=0)
    examples = [Example(prompt="p" * 10, completion="c"), Example(prompt="ab", completion="cdefghij")]
    with pytest.warns(ExamplesSkipped, match="1 of 2 examples"):
        rows = instruction_rows(examples, tok, seq_len=8)
    assert rows == [([97, 98, 99, 100, 101, 102, 103, 104], [IGNORE_INDEX, IGNORE_INDEX, 99, 100, 101, 102, 103, 104])]
    with pytest.raises(DataError, match="none of the 1 examples .* raise --seq-len"):
        instruction_rows(examples[:1], tok, seq_len=8)


def test_padded_rows_and_their_trimmed_batches() -> None:
    from adapters.batches import TokenRows

    rows = [([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8, 9], [IGNORE_INDEX, 9]), ([1], [1])]
    tensors = padded(rows, 6, pad=0)
    assert tensors["input_ids"].tolist()[1] == [8, 9, 0, 0, 0, 0]
    assert tensors["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0, 0]
    assert tensors["labels"].tolist()[1] == [IGNORE_INDEX, 9] + [IGNORE_INDEX] * 4
    data = TokenRows(trim=True, **tensors)
    batch = data.collate([data[1], data[2]])
    assert batch["input_ids"].tolist() == [[8, 9], [1, 0]]  # as wide as the longest row
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 9], [1, IGNORE_INDEX]]


def test_packed_rows_restart_positions_and_mask_each_start() -> None:
    lengths = [5, 3, 4, 2, 6, 1]
    rows = [(list(range(100 * (i + 1), 100 * (i + 1) + n)), list(range(100 * (i + 1), 100 * (i + 1) + n)))
            for i, n in enumerate(lengths)]
    out = packed(rows, 8, pad=0)
    ids, positions, labels = out["input_ids"], out["position_ids"], out["labels"]
    assert ids.shape == (3, 8)  # 21 tokens in rows of 8, best fit: [6, 2], [5, 3], [4, 1]
    seen = []
    for r in range(3):
        starts = (positions[r] == 0).nonzero().flatten().tolist()
        for s, e in zip(starts, [*starts[1:], 8]):
            segment = ids[r, s:e].tolist()
            assert positions[r, s:e].tolist() == list(range(e - s))
            if segment[0] == 0:  # the padding that closes a row trains nothing
                assert labels[r, s:e].tolist() == [IGNORE_INDEX] * (e - s)
                continue
            seen.append(segment)
            assert labels[r, s].item() == IGNORE_INDEX  # no example is trained to follow the previous one
            assert labels[r, s + 1:e].tolist() == segment[1:]
    assert sorted(seen) == sorted(ids for ids, _ in rows)


@pytest.mark.parametrize(("rows", "fragments"), [
    ([{"prompt": "a", "completion": "b"}, {"text": "c"}], [":2:", "text example", ":1 is prompt-completion"]),
    ([{"prompt": "a"}, {"prompt": "b"}], [":1:", '"prompt" but no "completion"']),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "  "}], [":2:", 'empty "completion"']),
    ([{"instruction": "", "output": "b"}] * 2, [":1:", 'empty "instruction"']),
    ([{"messages": [{"role": "user", "content": "hi"}]}] * 2, [":1:", 'no "assistant" message']),
    ([{"messages": "hi"}] * 2, [":1:", '"messages" must be a non-empty list']),
    ([{"messages": [{"role": "user"}]}] * 2, [":1:", 'message 1 must be an object with a string "role"']),
    ([{"prompt": 1, "completion": "b"}] * 2, [":1:", '"prompt" must be a string']),
])
def test_instruction_data_errors_name_the_line(tmp_path: Path, rows: list[dict], fragments: list[str]) -> None:
    assert_data_error(write(tmp_path, "d.jsonl", jsonl(rows)), "causal-lm", *fragments)


def test_csv_cannot_hold_messages(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", 'messages\n"[{""role"": ""user""}]"\nx\n')
    assert_data_error(path, "causal-lm", f"{path}:2", '"messages" must be a non-empty list')


def test_json_must_be_an_array(tmp_path: Path) -> None:
    assert_data_error(write(tmp_path, "d.json", '{"text": "a"}'), "causal-lm", "JSON array", ".jsonl")


def test_parquet_rows_are_named_in_errors(tmp_path: Path) -> None:
    path = write_rows(tmp_path, "parquet", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}])
    assert_data_error(path, "causal-lm", f"{path} row 2", 'empty "completion"')


def test_instruction_data_cannot_classify(tmp_path: Path) -> None:
    assert_data_error(write(tmp_path, "d.jsonl", jsonl(PC_ROWS)), "sequence-classification",
                      "prompt-completion data", '"text" and "label"')


def test_without_the_datasets_library_the_error_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    path = write_rows(tmp_path, "parquet", PC_ROWS)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import datasets -> ImportError
    assert_data_error(path, "causal-lm", "datasets", "pip install 'adapters-lab[data]'")


def test_a_directory_not_saved_by_datasets(tmp_path: Path) -> None:
    assert_data_error(tmp_path, "causal-lm", "save_to_disk")


@pytest.mark.parametrize("source", [5, {"text": "a"}, b"a.jsonl"])
def test_data_that_is_no_dataset(source) -> None:
    with pytest.raises(DataError, match="not a dataset; give a file path"):
        load_dataset(source, "causal-lm")


def test_data_given_in_python_is_recorded_by_description_and_refused_as_a_path() -> None:
    from adapters.resolver import resolve
    from adapters.runspec import RunSpec

    run = resolve(RunSpec(model="random:tiny", data=iter(PC_ROWS)))
    assert run.spec.data == "<list_iterator: 12 rows>"
    assert run.spec.packing is True and run.spec.train_on_prompt is False
    json.dumps(run.spec.to_dict())  # what checkpoints and the manifest record
    with pytest.raises(DataError, match="given in Python, which its records cannot hold"):
        load_dataset(run.spec.data, "causal-lm")


def test_builtin_instructions_are_real_deterministic_and_held_out_by_section() -> None:
    from pydoc_data.topics import topics

    ds = load_dataset("builtin:instructions", "causal-lm")
    assert ds.name == "python-instructions" and ds.shape == "prompt-completion"
    assert load_dataset("builtin:instructions", "causal-lm") == ds
    assert len(ds.train) > 100 and 5 <= len(ds.heldout) < len(ds.train) // 5
    prompts = [ex.prompt for ex in ds.train + ds.heldout]
    assert len(set(prompts)) == len(prompts)  # one example per section: held out means never trained on
    assert {ex.prompt for ex in ds.train}.isdisjoint(ex.prompt for ex in ds.heldout)
    reference = "\n".join(topics.values())
    for ex in ds.train + ds.heldout:
        assert ex.prompt.startswith("Explain ") and ex.prompt.endswith(" in Python.\n")
        assert 100 <= len(ex.completion) <= 500 and ex.completion in reference
    assert any(ex.completion.startswith('The "if" statement is used for conditional execution')
               for ex in ds.train + ds.heldout)


def test_builtin_names() -> None:
    assert load_dataset("builtin:python-reference", "causal-lm") == default_dataset("causal-lm")
    with pytest.raises(DataError, match="builtin:instructions, builtin:stdlib-docstrings"):
        load_dataset("builtin:nope", "causal-lm")
    with pytest.raises(DataError, match="is causal-lm data, not sequence-classification"):
        load_dataset("builtin:instructions", "sequence-classification")
