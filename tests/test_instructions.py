"""Instruction and chat data end to end: packed attention stays within examples, every shape trains on the real
SmolLM2 with its prompts masked and lowers the held-out loss on completions, and the train command's flags."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import adapters
from adapters import batches
from adapters import data as datasets
from adapters.rules import IGNORE_INDEX
from adapters.training import make_batches

from cli_helpers import assert_user_error, run_in_process


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return list(zip(starts, [*starts[1:], position_ids.numel()]))


@pytest.mark.parametrize("model", ["random:tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_packed_rows_give_each_example_its_logits_alone(model: str, request) -> None:
    """transformers reads restarting position ids (and no attention mask) as separate sequences: each example's
    logits in a packed row are its logits computed alone, with sdpa and eager attention alike."""
    base = request.getfixturevalue("smollm2") if model == "smollm2" else adapters.load_base_model(model)
    examples = datasets.load_dataset("builtin:instructions", "causal-lm").heldout[:4]
    # Lengths that vary, so rows hold examples of several sizes; every label trained, so that the padding closing
    # a row is the only segment without one.
    rows = [(ids[: 12 + 7 * i], labels[: 12 + 7 * i]) for i, (ids, labels) in
            enumerate(batches.instruction_rows(examples, base.tokenizer, 64, train_on_prompt=True))]
    batch = batches.packed(rows, 64, batches.pad_id(base.tokenizer))
    config = base.model.config
    implementation = config._attn_implementation
    try:
        for attention in ("sdpa", "eager"):
            config._attn_implementation = attention
            with torch.no_grad():
                # Without a key/value cache, as training runs (with one, transformers looks for no packed rows).
                together = base.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                      use_cache=False).logits
                leaking = base.model(input_ids=batch["input_ids"], use_cache=False).logits
                checked = 0
                for r, positions in enumerate(batch["position_ids"]):
                    for start, end in _segments(positions):
                        if bool((batch["labels"][r, start:end] == IGNORE_INDEX).all()):
                            continue  # the padding that closes the row
                        alone = base.model(input_ids=batch["input_ids"][r:r + 1, start:end]).logits[0]
                        torch.testing.assert_close(together[r, start:end], alone, atol=1e-3, rtol=1e-4)
                        checked += 1
            assert checked == len(rows)
            # Without the position ids the second example of a row would see the first: the check can fail.
            assert not torch.allclose(leaking, together, atol=1e-3)
    finally:
        config._attn_implementation = implementation


def test_packed_and_padded_batches_have_the_same_loss() -> None:
    """Packing changes how examples share rows, not what is trained: the loss over the same examples is equal."""
    base = adapters.load_base_model("random:tiny")
    examples = datasets.load_dataset("builtin:instructions", "causal-lm").train[:8]
    short = [datasets.Example(prompt=ex.prompt, completion=ex.completion[:40 + 9 * i]) for i, ex in enumerate(examples)]
    pack = make_batches(short, base, 256, "train", packing=True).tensors
    pad = make_batches(short, base, 256, "train").tensors
    assert len(pack["input_ids"]) < len(pad["input_ids"])
    with torch.no_grad():
        packed_loss = base.model(**pack, use_cache=False).loss
        padded_loss = base.model(**pad, use_cache=False).loss
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)


def _rows(shape: str, examples: list[datasets.Example]) -> list[dict]:
    """The built-in instructions written in ``shape``'s columns."""
    if shape == "messages":
        return [{"messages": [{"role": "user", "content": ex.prompt.strip()},
                              {"role": "assistant", "content": ex.completion}]} for ex in examples]
    if shape == "prompt-completion":
        return [{"prompt": ex.prompt, "completion": ex.completion} for ex in examples]
    if shape == "alpaca":
        return [{"instruction": ex.prompt.strip(), "input": "", "output": ex.completion} for ex in examples]
    return [{"text": ex.prompt + ex.completion} for ex in examples]


def _save(shape: str, rows: list[dict], tmp_path: Path):
    """Each shape through another container: a Dataset object, csv, jsonl (prompt/completion: the built-in set)."""
    import datasets as hf

    if shape == "messages":
        return hf.Dataset.from_list(rows)
    if shape == "alpaca":
        import csv

        with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return str(tmp_path / "d.csv")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(tmp_path / "d.jsonl")


def _prompt_length(shape: str, example: datasets.Example, tokenizer) -> int:
    """How many leading tokens of ``example`` are prompt, worked out apart from adapters' masking."""
    if shape == "messages":
        prompt = tokenizer.apply_chat_template(example.messages[:1], tokenize=False, add_generation_prompt=True)
    elif shape == "text":
        return 0
    else:
        prompt = example.prompt
    return len(tokenizer.encode(prompt, add_special_tokens=False))


def _assert_masked(shape: str, example: datasets.Example, base, seq_len: int) -> None:
    """The labels training gives ``example``: -100 on the prompt part, the input ids on the completion part."""
    batch = make_batches([example], base, seq_len, "held-out").tensors
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    n = _prompt_length(shape, example, base.tokenizer)
    length = int(batch["attention_mask"][0].sum()) if "attention_mask" in batch else seq_len
    assert n < length
    assert labels[:n].tolist() == [IGNORE_INDEX] * n
    assert labels[n:length].tolist() == ids[n:length].tolist()


# A few steps with a high learning rate: enough for LoRA to move the held-out loss, cheap on two cores.
FEW_STEPS = ["--max-steps", "2", "--batch-size", "4", "--seq-len", "48", "--learning-rate", "2e-3",
             "--eval-batches", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["messages", "alpaca", "text"])
def test_each_shape_trains_smollm2_on_completions_and_lowers_heldout_loss(shape: str, tmp_path: Path) -> None:
    source = datasets.load_dataset("builtin:instructions", "causal-lm")
    data = _save(shape, _rows(shape, source.train[:40] + source.heldout), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = adapters.train(adapters.RunSpec(data=data, max_steps=2, batch_size=4, seq_len=48,
                                                 learning_rate=2e-3, eval_batches=1), progress=False)
    assert result.status == "completed", result.reason
    assert result.after["loss"] < result.before["loss"] - 0.02, (result.before, result.after)
    _assert_masked(shape, datasets.load_dataset(data, "causal-lm").heldout[0], result.base, 48)


@pytest.mark.slow
def test_builtin_instructions_lower_heldout_completion_loss_on_smollm2(capsys, tmp_path: Path, smollm2) -> None:
    """The built-in set is prompt/completion data: the fourth shape, through the command line."""
    code, out, err = run_in_process(capsys, "train", "--data", "builtin:instructions", *FEW_STEPS,
                                    "--output", str(tmp_path / "run"), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["heldout_after"]["loss"] < summary["heldout_before"]["loss"] - 0.02
    training = json.loads((tmp_path / "run" / "adapters.json").read_text())["training"]
    assert (training["data"], training["packing"], training["train_on_prompt"]) == ("builtin:instructions", True, False)
    assert training["chat_template"] is False  # prompt/completion data is joined as plain text
    _assert_masked("prompt-completion", datasets.load_dataset("builtin:instructions", "causal-lm").heldout[0],
                   smollm2, 48)


def test_train_flags_no_packing_and_train_on_prompt(capsys, tmp_path: Path) -> None:
    rows = [{"prompt": f"Question {i}? ", "completion": f"Answer {i}."} for i in range(10)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, out, err = run_in_process(capsys, "train", "--model", "random:tiny", "--data", str(path), "--max-steps",
                                    "1", "--seq-len", "32", "--no-packing", "--train-on-prompt",
                                    "--output", str(tmp_path / "run"), "--json")
    assert code == 0, err
    training = json.loads((tmp_path / "run" / "adapters.json").read_text())["training"]
    assert (training["packing"], training["train_on_prompt"]) == (False, True)
    base = adapters.load_base_model("random:tiny")  # its tokens are UTF-8 bytes
    examples = datasets.load_dataset(str(path), "causal-lm").train
    trained = make_batches(examples, base, 32, "train", train_on_prompt=True).tensors
    masked = make_batches(examples, base, 32, "train").tensors
    ids = masked["input_ids"]
    for i, example in enumerate(examples):
        n, length = len(example.prompt.encode()), int(masked["attention_mask"][i].sum())
        assert masked["labels"][i, :n].tolist() == [IGNORE_INDEX] * n
        assert masked["labels"][i, n:length].tolist() == ids[i, n:length].tolist()
        assert trained["labels"][i, :length].tolist() == ids[i, :length].tolist()


@pytest.mark.parametrize(("args", "needles"), [
    (["--task", "sequence-classification", "--packing"], ["--packing applies to causal-lm data"]),
    (["--data", "builtin:nope"], ["builtin:nope", "builtin:instructions"]),
    (["--data", "CHAT"], ["CHAT:", "chat template", "has none"]),
    (["--data", "MIXED"], ["MIXED:2", "a text example", "MIXED:1 is prompt-completion"]),
])
def test_train_data_errors_are_one_line(capsys, tmp_path: Path, args: list[str], needles: list[str]) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": "yo"}]}) + "\n"
                            for i in range(2)))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "completion": "b"}\n{"text": "c"}\n')
    paths = {"CHAT": str(chat), "MIXED": str(mixed)}
    args = [paths.get(a, a) for a in args]
    needles = [n.replace("CHAT", str(chat)).replace("MIXED", str(mixed)) for n in needles]
    code, out, err = run_in_process(capsys, "train", "--model", "random:tiny", "--max-steps", "1", "--seq-len", "16",
                                    *args)
    assert_user_error(code, out, err, *needles)
