"""The `adapters` command line, run as a real subprocess (and in-process for the cheaper cases)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapters

from cli_helpers import assert_user_error, run_captured, run_cli, run_in_process

TINY = ["--model", "random:tiny"]
QUICK = ["--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1"]








# --------------------------------------------------------------------------------------------
# Listings


def test_strategies_json_lists_the_builtins():
    done = run_cli("strategies", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert {"lora", "qlora", "prefix-tuning", "linear-probe", "full-finetune"} <= set(rows)
    assert rows["qlora"]["default_quantization"] == "nf4"
    assert rows["qlora"]["plugin"] == rows["lora"]["plugin"] == "adapters_lora"
    assert rows["lora"]["default_quantization"] == "none"
    assert rows["full-finetune"]["supported_quantization"] == ["none"]
    assert rows["prefix-tuning"]["supports_gradient_checkpointing"] is False
    assert rows["prefix-tuning"]["supported_tasks"] == ["causal-lm"]
    lora_options = {o["name"]: o for o in rows["lora"]["options"]}
    assert lora_options["r"]["default"] == 16 and lora_options["r"]["type"] == "int"
    assert lora_options["target_modules"]["default"] == "all-linear"


def test_plugins_json_lists_the_builtin_plugins():
    done = run_cli("plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    # No entry-point plugins under ADAPTERS_LOAD_PLUGINS="".
    assert set(rows) == set(adapters.host.manager.DEFAULT_PLUGINS)
    assert rows["adapters_lora"]["strategies"] == ["lora", "qlora"]
    assert rows["adapters_full"]["strategies"] == ["full-finetune"]
    assert all(r["builtin"] and r["distribution"] == "adapters-lab" for r in rows.values())
    assert {name: r["hooks"] for name, r in rows.items() if r["hooks"] != ["register_strategies"]} == {
        "adapters.reports.renderers": ["register_report_renderers"], "adapters.data.formats": ["register_data_readers"]}
    assert rows["adapters.reports.renderers"]["report_formats"] == ["html", "markdown"]
    assert rows["adapters.data.formats"]["data_readers"] == ["csv", "json", "jsonl", "parquet", "save-to-disk", "text"]


def test_models_lists_the_named_models():
    done = run_cli("models")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines()[2:] if line.strip()}
    assert listed == set(adapters.models.MODELS)
    tiny = next(line for line in done.stdout.splitlines() if line.startswith("random:tiny "))
    assert tiny.split()[1] == "yes"  # random shapes are always available


def test_models_json_in_process(capsys):
    code, out, _ = run_in_process(capsys, "models", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["random:tiny"]["available"] is True
    assert rows["minilm-l6"]["tasks"] == ["sequence-classification"]


# --------------------------------------------------------------------------------------------
# User errors: exit 2, one line, no traceback.
# A handful run as real subprocesses; the rest in-process through the same `main`.


def test_unknown_strategy_suggests_a_close_match():
    done = run_cli("train", *TINY, "--strategy", "lorra")
    assert_user_error(done.returncode, done.stdout, done.stderr, "'lorra'", "Did you mean 'lora'?",
                      "full-finetune", "prefix-tuning")


def test_unknown_model():
    done = run_cli("train", "--model", "no-such-model", "--strategy", "lora")
    assert_user_error(done.returncode, done.stdout, done.stderr, "'no-such-model'", "random:tiny")


def test_full_finetune_refuses_quantization_naming_alternatives(capsys):
    code, out, err = run_in_process(capsys, "train", *TINY, "--strategy", "full-finetune", "--quantization", "nf4")
    line = assert_user_error(code, out, err, "'full-finetune'", "nf4", "--quantization none")
    for alternative in ("lora", "qlora", "linear-probe", "prefix-tuning"):
        assert alternative in line


def test_unmatched_target_modules_list_available_names():
    # Fails after the model is loaded and PEFT (and with it bitsandbytes) is imported: stderr must still
    # hold only the error line.
    done = run_cli("train", *TINY, *QUICK, "--strategy", "lora", "--set", "target_modules=nope")
    assert_user_error(done.returncode, done.stdout, done.stderr, "nope", "q_proj", "v_proj", "down_proj")


def test_non_empty_output_dir_is_refused_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "x.bin").write_bytes(b"\x00\x01")
    assert_user_error(*run_in_process(capsys, "train", *TINY, *QUICK, "--output", str(out)), str(out), "--overwrite")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["keep.txt", "sub", "sub/x.bin"]
    assert (out / "keep.txt").read_text() == "precious"
    assert (out / "sub" / "x.bin").read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp directory left beside it


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    done = run_cli("train", "--config", str(missing))
    assert_user_error(done.returncode, done.stdout, done.stderr, str(missing), "not found")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case",
    ["full-finetune@nf4", "conflicting@", "r=abc", "unknown-key", "bad-set", "empty-data", "malformed-jsonl",
     "prefix-checkpointing", "bad-toml", "unknown-toml-key", "unknown-strategy-in-process", "bad-steps"],
)
def test_user_errors_in_process(case, tmp_path, capsys):
    args, needles = {
        "full-finetune@nf4": (["--strategy", "full-finetune@nf4"], ["'full-finetune'", "nf4", "lora"]),
        "conflicting@": (["--strategy", "lora@nf4", "--quantization", "int8"], ["nf4", "int8", "only one"]),
        "r=abc": (["--set", "r=abc"], ["'r'", "int", "'abc'"]),
        "unknown-key": (["--set", "rank=8"], ["'rank'", "alpha, dropout, init, lora_plus_ratio, r, target_modules, use_dora, use_rslora"]),
        "bad-set": (["--set", "r"], ["'r'", "key=value"]),
        "empty-data": (["--data", write(tmp_path / "empty.txt", "  \n\n")], ["empty.txt", "empty"]),
        "malformed-jsonl": (["--data", write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')],
                            ["bad.jsonl:2", "malformed JSON"]),
        "prefix-checkpointing": (["--strategy", "prefix-tuning", "--gradient-checkpointing"],
                                 ["'prefix-tuning'", "--gradient-checkpointing"]),
        "bad-toml": (["--config", write(tmp_path / "bad.toml", "max-steps = = 3\n")], ["bad.toml", "TOML"]),
        "unknown-toml-key": (["--config", write(tmp_path / "k.toml", "max_stepz = 3\n")], ["'max_stepz'", "max-steps"]),
        "unknown-strategy-in-process": (["--strategy", "prefix_tuning"], ["Did you mean 'prefix-tuning'?"]),
        "bad-steps": (["--max-steps", "0"], ["--max-steps", "at least 1"]),
    }[case]
    code, out, err = run_in_process(capsys, "train", *TINY, *QUICK[2:], *args)
    assert_user_error(code, out, err, *needles)


def test_click_usage_errors_are_not_tracebacks(capsys):
    code, _, err = run_in_process(capsys, "train", "--quantization", "int3")
    assert code == 2 and "Traceback" not in err and "int3" in err


# --------------------------------------------------------------------------------------------
# A successful run, and its output loaded with plain PEFT.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LoRA run through `main` in this process (the real subprocesses: the QLoRA and torchrun runs below)."""
    out = tmp_path_factory.mktemp("cli") / "lora-out"
    done = run_captured("train", *TINY, "--strategy", "lora", "--max-steps", "2", "--batch-size", "2", "--seq-len",
                        "32", "--eval-batches", "1", "--output", str(out), "--json")
    return done, out


def test_train_json_summary(trained):
    done, out = trained
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    summary = json.loads(done.stdout)
    assert summary["strategy"] == "lora" and summary["model"] == "random:tiny"
    assert summary["quantization"] == "none" and summary["task"] == "causal-lm" and summary["steps"] == 2
    base = adapters.load_base_model("random:tiny").model
    total_base = sum(p.numel() for p in base.parameters())
    assert 0 < summary["trainable_parameters"] < total_base
    assert summary["total_parameters"] == total_base + summary["trainable_parameters"]
    for key in ("heldout_before", "heldout_after"):
        metrics = summary[key]
        assert set(metrics) == {"loss", "perplexity"}
        assert metrics["loss"] > 0
        assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-4)
    assert summary["output"] == str(out)


def test_train_output_directory(trained):
    done, out = trained
    assert done.returncode == 0, done.stderr
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "adapters.json"} <= files
    assert not any(name.startswith(".") for name in files)
    manifest = json.loads((out / "adapters.json").read_text())
    assert manifest["strategy"] == "lora" and manifest["base_model"] == "random:tiny"
    assert manifest["training"]["max_steps"] == 2
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp directories left


def test_plain_peft_loads_the_saved_lora_exactly(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    done, out = trained
    assert done.returncode == 0, done.stderr
    ours = adapters.load(out).model.eval()

    checkpoint = adapters.models.MODELS["random:tiny"].locate()
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()

    x = torch.arange(3, 35).unsqueeze(0)
    with torch.no_grad():
        expected = ours(input_ids=x).logits
        got = peft_model(input_ids=x).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=x).logits
    assert torch.equal(got, expected)
    assert not torch.equal(plain, expected)  # the adapter was trained: it changes the output


# --------------------------------------------------------------------------------------------
# Config files


def test_config_file_with_flag_override(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        'model = "random:tiny"\n'
        'strategy = "lora"\n'
        "max-steps = 3\n"
        "batch_size = 2\n"
        "seq-len = 32\n"
        "eval-batches = 1\n"
        "[options]\n"
        "r = 4\n"
        'target_modules = "q_proj,v_proj"\n'
    )
    out_dir = tmp_path / "out"
    code, out, err = run_in_process(capsys, "train", "--config", str(config), "--max-steps", "1", "--set", "alpha=8",
                                    "--output", str(out_dir), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["model"] == "random:tiny"  # from the file: the --model default did not override it
    assert summary["steps"] == 1  # the flag won over the file
    # r=4 LoRA on q_proj (64 -> 64) and v_proj (64 -> 32) in each of 2 layers.
    assert summary["trainable_parameters"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    manifest = json.loads((out_dir / "adapters.json").read_text())
    # [options] from the file and --set from the command line are merged.
    assert manifest["config"]["r"] == 4 and manifest["config"]["alpha"] == 8
    assert manifest["config"]["target_modules"] == "q_proj,v_proj"
    assert manifest["training"]["batch_size"] == 2 and manifest["training"]["seq_len"] == 32


def test_done_when_qlora_on_real_smollm2_loads_in_plain_peft(tmp_path):
    """The core issue's acceptance command: QLoRA on the real SmolLM2 via the CLI, loaded by plain PEFT."""
    from peft import PeftModel

    out = tmp_path / "D"
    result = subprocess.run(
        [sys.executable, "-m", "adapters", "train", "--model", "smollm2-135m", "--strategy", "qlora",
         "--max-steps", "2", "--batch-size", "2", "--seq-len", "64", "--eval-batches", "1", "--output", str(out)],
        capture_output=True, text=True, env=dict(os.environ), timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "qlora on smollm2-135m (nf4, causal-lm)" in result.stdout
    restored = adapters.load(out)
    plain = PeftModel.from_pretrained(adapters.load_base_model("smollm2-135m", quantization="nf4").model, out)
    ids = torch.tensor([restored.base.tokenizer.encode("The capital of France is")])
    restored.model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, restored.model(input_ids=ids).logits)


def test_data_parallel_training_on_the_cpu_with_torchrun(tmp_path):
    """Two processes join one group (gloo on the CPU), one of them saves and reports."""
    out = tmp_path / "ddp"
    env = {**os.environ, "ADAPTERS_LOAD_PLUGINS": ""}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "adapters", "train", *TINY,
         *QUICK, "--output", str(out), "--json"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)  # exactly one JSON document: only the main process reports
    assert summary["processes"] == 2 and summary["output"] == str(out)
    restored = adapters.load(out)
    assert restored.strategy.name == "lora"
