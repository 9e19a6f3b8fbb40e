"""The README is executable: its plugin section is a working package, its commands are CI's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _block(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", README, re.S)
    assert match, f"README has no code block after <!-- {marker} -->"
    return match.group(1)


def _adapters(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapters", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """The README's plugin, written to disk as-is and pip-installed into a private target dir."""
    tmp = tmp_path_factory.mktemp("readme-plugin")
    package, site = tmp / "package", tmp / "site"
    package.mkdir()
    (package / "adapters_bitfit.py").write_text(_block("plugin-module"))
    (package / "pyproject.toml").write_text(_block("plugin-pyproject"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(package)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERS_LOAD_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return env


def test_readme_plugin_is_discovered_by_entry_point(installed_plugin):
    result = _adapters("strategies", "--json", env=installed_plugin)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["bitfit"]["plugin"] == "bitfit"
    assert {"lora", "prefix-tuning", "linear-probe", "full-finetune"} <= set(rows)
    plugins = json.loads(_adapters("plugins", "--json", env=installed_plugin).stdout)
    bitfit = next(p for p in plugins if p["name"] == "bitfit")
    assert bitfit["distribution"] == "adapters-bitfit" and bitfit["strategies"] == ["bitfit"]


def test_readme_plugin_trains_by_name_and_saves_only_its_weights(installed_plugin, tmp_path):
    out = tmp_path / "bitfit"
    result = _adapters("train", "--model", "random:tiny", "--strategy", "bitfit", "--max-steps", "2",
                       "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--output", str(out),
                       "--json", env=installed_plugin)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    with safe_open(out / "weights.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k).numel() for k in f.keys()}
    assert saved and all("norm" in k for k in saved)
    assert summary["trainable_parameters"] == sum(saved.values())


def test_installed_plugins_do_not_load_under_the_test_allow_list(installed_plugin):
    env = dict(installed_plugin, ADAPTERS_LOAD_PLUGINS="")
    names = {r["name"] for r in json.loads(_adapters("strategies", "--json", env=env).stdout)}
    assert "bitfit" not in names


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    lines = [line for line in commands.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 2
    assert "adapters bench --suite benchmarks/suites/default.toml" in lines[0]
    assert lines[1] in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / "benchmarks" / "suites" / "default.toml").exists()


def test_readme_chat_file_is_chat_data_that_masks_all_but_the_answers(tmp_path, monkeypatch, smollm2):
    """The worked example's chat.jsonl, written by the README's own snippet, is read as chat data, and its rows
    train on the assistant's tokens alone (rendered with SmolLM2-Instruct's chat template)."""
    from adapters.batches import instruction_rows
    from adapters.data import load_dataset
    from adapters.rules import IGNORE_INDEX

    monkeypatch.chdir(tmp_path)
    exec(compile(_block("chat-data"), "README chat-data", "exec"), {})
    lines = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert len(lines) > 50 and all([m["role"] for m in line["messages"]] == ["user", "assistant"] for line in lines)
    data = load_dataset(str(tmp_path / "chat.jsonl"), "causal-lm")
    assert data.shape == "messages" and data.train and data.heldout
    tokenizer = smollm2.tokenizer
    ids, labels = instruction_rows(data.train[:1], tokenizer, 512)[0]
    trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    answer = data.train[0].messages[-1]["content"]
    assert answer.split()[0] in tokenizer.decode(trained) and "In Python, what is" not in tokenizer.decode(trained)
