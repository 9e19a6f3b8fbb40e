"""`adapters generate` on a run trained on chat data: the prompt goes through the chat template by default,
as training rendered every example, and a generation without text says so.

The chat run is the real SmolLM2-135M-Instruct trained two steps on a chat file made from the Python reference
(as the README's worked example makes it), through the real command line.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapters.evaluation import Opened, inspect_run
from adapters.generate import Generator, NothingGenerated

from cli_helpers import assert_user_error, run_captured, run_in_process

QUESTION = "What is the capital of Peru?"
STATEMENT = "The capital of Peru is"


def _chat_file(path: Path) -> Path:
    """A question about each topic of the Python reference, answered with the topic's first paragraph."""
    import pydoc_data.topics as topics

    rows = []
    for name, text in sorted(topics.topics.items()):
        prose = [" ".join(p.split()) for p in text.split("\n\n")[1:] if len(p) > 80 and not p.startswith(" ")]
        if prose:
            rows.append({"messages": [{"role": "user", "content": f"In Python, what is {name}?"},
                                      {"role": "assistant", "content": prose[0]}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_training(tmp_path_factory) -> tuple[Path, dict]:
    """The chat run and its train summary."""
    tmp = tmp_path_factory.mktemp("chat")
    out = tmp / "run"
    result = run_captured("train", "--data", str(_chat_file(tmp / "chat.jsonl")), "--max-steps", "2",
                          "--batch-size", "2", "--seq-len", "64", "--eval-batches", "1", "--learning-rate", "1e-3",
                          "--output", str(out), "--json")
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def chat_run(chat_training) -> Path:
    return chat_training[0]


@pytest.fixture(scope="module")
def chat_generator(chat_run) -> Generator:
    return Generator(chat_run)


def _text(generator: Generator, prompt: str, **options) -> str:
    return "".join(generator.generate(prompt, **options))


@pytest.mark.slow
def test_a_chat_run_records_it_and_renders_prompts_through_its_template(chat_run, chat_generator):
    assert json.loads((chat_run / "adapters.json").read_text())["training"]["chat_template"] is True
    tokenizer = chat_generator.opened.tokenizer
    templated = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                              tokenize=True)["input_ids"]
    assert chat_generator.chat_default
    assert chat_generator.prompt_ids(QUESTION) == list(templated)
    assert chat_generator.prompt_ids(QUESTION, chat=False) == tokenizer.encode(QUESTION)


@pytest.mark.slow
def test_generate_answers_through_the_template_by_default_and_no_chat_continues_plain_text(chat_run, chat_generator,
                                                                                            capsys):
    code, out, err = run_in_process(capsys, "generate", str(chat_run), "--prompt", QUESTION, "--max-new-tokens", "16")
    assert code == 0, err
    assert out == _text(chat_generator, QUESTION, chat=True, max_new_tokens=16) + "\n"
    assert "Lima" in out
    code, out, err = run_in_process(capsys, "generate", str(chat_run), "--no-chat", "--prompt", STATEMENT,
                                    "--max-new-tokens", "8")
    assert code == 0, err
    assert out.strip() and out == _text(chat_generator, STATEMENT, chat=False, max_new_tokens=8) + "\n"
    assert out != _text(chat_generator, STATEMENT, max_new_tokens=8) + "\n"


@pytest.mark.slow
def test_a_generation_without_text_says_why_and_exits_2(chat_run, chat_generator, capsys):
    """The bare question, which the chat run never saw without its template, ends at the first token."""
    code, out, err = run_in_process(capsys, "generate", str(chat_run), "--no-chat", "--prompt", QUESTION)
    assert_user_error(code, out, err, str(chat_run), "generated no text", "ended its answer at once", "<|im_end|>",
                      "give --chat")
    assert out == ""
    with pytest.raises(NothingGenerated, match="ended its answer at once"):
        _text(chat_generator, QUESTION, chat=False)


@pytest.mark.slow
def test_compare_base_says_which_answer_had_no_text_and_still_gives_the_other(chat_run, capsys):
    code, out, err = run_in_process(capsys, "generate", str(chat_run), "--no-chat", "--prompt", QUESTION,
                                    "--compare-base", "--max-new-tokens", "4")
    assert code == 2
    assert out == "--- lora on smollm2-135m ---\n--- base: adapter disabled ---\n"
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err
    assert lines[0].startswith(f"Error: {chat_run} (lora on smollm2-135m) generated no text")
    assert lines[1].startswith("Error: the base model (adapter disabled) generated no text")


@pytest.mark.slow
def test_a_run_saved_before_the_record_continues_plain_text(chat_run, chat_generator, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(chat_run, old)
    manifest = json.loads((old / "adapters.json").read_text())
    del manifest["training"]["chat_template"]
    (old / "adapters.json").write_text(json.dumps(manifest))
    generator = Generator(Opened(inspect_run(old), chat_generator.opened.model, chat_generator.opened.base))
    assert not generator.chat_default
    assert generator.prompt_ids(QUESTION) == chat_generator.prompt_ids(QUESTION, chat=False)
    with pytest.raises(NothingGenerated, match="give --chat"):
        _text(generator, QUESTION)
    assert _text(generator, QUESTION, chat=True, max_new_tokens=16) == _text(chat_generator, QUESTION,
                                                                              max_new_tokens=16)


@pytest.mark.slow
def test_a_merged_chat_run_answers_through_the_template_by_default(chat_run, chat_generator, tmp_path, capsys):
    merged = tmp_path / "merged"
    code, out, err = run_in_process(capsys, "merge", str(chat_run), "--output", str(merged))
    assert code == 0, err
    assert json.loads((merged / "adapters.json").read_text())["merged_from"]["training"]["chat_template"] is True
    code, out, err = run_in_process(capsys, "generate", str(merged), "--prompt", QUESTION, "--max-new-tokens", "16")
    assert code == 0, err
    assert out == _text(chat_generator, QUESTION, max_new_tokens=16) + "\n"


@pytest.mark.slow
def test_eval_of_a_chat_run_renders_its_chats_as_training_did(chat_training, capsys):
    """eval scores held-out chats through the same template and masking as training: the same loss."""
    run, summary = chat_training
    code, out, err = run_in_process(capsys, "eval", str(run), "--json")
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(summary["heldout_after"]["loss"], abs=1e-6, rel=0)


@pytest.mark.parametrize("shape", ["text", "prompt-completion", "alpaca"])
def test_a_run_trained_on_other_data_is_not_chat_templated(shape, tmp_path, capsys):
    """Instruction data is joined as plain text (alpaca through its own template), never the chat template."""
    row = {"text": lambda i: {"text": f"Line {i} of plain text, long enough to fill a block of tokens."},
           "prompt-completion": lambda i: {"prompt": f"Question {i}? ", "completion": f"Answer {i}."},
           "alpaca": lambda i: {"instruction": f"Say {i}.", "output": f"{i}."}}[shape]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row(i)) + "\n" for i in range(60)), encoding="utf-8")
    code, out, err = run_in_process(capsys, "train", "--model", "random:tiny", "--data", str(data), "--max-steps", "1",
                                    "--seq-len", "256", "--eval-batches", "1", "--output", str(tmp_path / "run"))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "adapters.json").read_text())["training"]["chat_template"] is False
    assert not Generator(tmp_path / "run").chat_default
