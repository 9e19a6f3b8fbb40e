"""The README's first commands are CI's, and the worked chat example's data (docs/data.md) is chat data.

The rest of the docs' commands are checked in test_docs_commands.py, their plugins in test_docs.py and
test_plugin_kit.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DATA = (ROOT / "docs" / "data.md").read_text()


def _block(text: str, marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"no code block after <!-- {marker} -->"
    return match.group(1)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    lines = [line for line in commands.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 2
    assert "adapters bench --suite benchmarks/suites/default.toml" in lines[0]
    assert lines[1] in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / "benchmarks" / "suites" / "default.toml").exists()


def test_the_docs_chat_file_is_chat_data_that_masks_all_but_the_answers(tmp_path, monkeypatch, smollm2):
    """The worked example's chat.jsonl, written by docs/data.md's own snippet, is read as chat data, and its rows
    train on the assistant's tokens alone (rendered with SmolLM2-Instruct's chat template)."""
    from adapters.batches import instruction_rows
    from adapters.data import load_dataset
    from adapters.rules import IGNORE_INDEX

    monkeypatch.chdir(tmp_path)
    exec(compile(_block(DATA, "chat-data"), "docs/data.md chat-data", "exec"), {})
    lines = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert len(lines) > 50 and all([m["role"] for m in line["messages"]] == ["user", "assistant"] for line in lines)
    data = load_dataset(str(tmp_path / "chat.jsonl"), "causal-lm")
    assert data.shape == "messages" and data.train and data.heldout
    tokenizer = smollm2.tokenizer
    ids, labels = instruction_rows(data.train[:1], tokenizer, 512)[0]
    trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    answer = data.train[0].messages[-1]["content"]
    assert answer.split()[0] in tokenizer.decode(trained) and "In Python, what is" not in tokenizer.decode(trained)
