"""Every PEFT method by name (plugins/adapters_peft_methods.py): listed from PEFT's own registry, options checked
by PEFT's config classes, what a method cannot do refused up front, saved in PEFT's format, and the conformance
kit over all of them, with docs/strategies.md's capability matrix checked against it."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import adapters_peft_methods as plugin
import pytest
import torch

import adapters
import adapters.testing.runner
from adapters.testing import CheckReport, matrix

from cli_helpers import assert_user_error, run_in_process

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "strategies.md"
TINY = ["--model", "random:tiny", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1"]
METHODS = {s.name: s for s in plugin.strategies()}


def test_methods_are_read_from_peft_in_another_interpreter_once(tmp_path, monkeypatch):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    code = ("import json, sys, adapters\n"
            "types = [m.peft_type for m in adapters.peft_methods()]\n"
            "print(json.dumps({'types': types, 'heavy': [m for m in ('torch', 'peft') if m in sys.modules]}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                          env={**os.environ, "ADAPTERS_CACHE_DIR": str(tmp_path)})
    read = json.loads(done.stdout)
    assert read["heavy"] == []  # PEFT was read in a child process
    assert set(read["types"]) == {str(t.value) for t in PEFT_TYPE_TO_CONFIG_MAPPING}
    (cached,) = tmp_path.glob("peft-methods-*.json")  # once per version of PEFT, transformers and bitsandbytes
    cached.write_text(json.dumps(json.loads(cached.read_text())[:-1]))
    monkeypatch.setenv("ADAPTERS_CACHE_DIR", str(tmp_path))
    adapters.peft._cached_methods.cache_clear()
    try:  # read from the file from then on, without PEFT
        assert [m.peft_type for m in adapters.peft_methods()] == read["types"][:-1]
    finally:
        adapters.peft._cached_methods.cache_clear()


def test_strategies_lists_peft_methods_with_their_options(capsys):
    code, out, _ = run_in_process(capsys, "strategies", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    peft = {name for name, r in rows.items() if r["plugin"] == "adapters_peft_methods"}
    assert len(peft) >= 20
    assert {"loha", "lokr", "vera", "oft", "boft", "ia3", "prompt-tuning", "adaption-prompt", "fourierft", "hra",
            "miss"} <= peft
    assert rows["lora"]["plugin"] == "adapters_lora" and rows["prefix-tuning"]["plugin"] == "adapters_prefix"
    assert not peft & {plugin.strategy_name(t) for t in plugin.NOT_REGISTERED}
    options = {o["name"]: o["default"] for o in rows["loha"]["options"]}
    assert options["r"] == 8 and options["alpha"] == 8 and options["target_modules"] == "all-linear"
    assert rows["loha"]["supported_quantization"] == ["none"]  # PEFT has no bitsandbytes layers for LoHa
    assert rows["ia3"]["supported_quantization"] == ["fp4", "int8", "nf4", "none"]  # it has for IA3
    assert rows["prompt-tuning"]["options"][0] == {"name": "num_virtual_tokens", "type": "int", "default": 20}
    for name in peft:  # PEFT's bookkeeping, what follows from the base, and what would load code are no options
        names = {o["name"] for o in rows[name]["options"]}
        assert not names & {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "revision",
                            "fan_in_fan_out", "token_dim", "num_layers"}, name
        assert not any(re.search("path|megatron|tokenizer", n) for n in names), name


@pytest.mark.parametrize("args, needles", [
    (["--strategy", "loha", "--set", "r=four"], ["option 'r' takes int, not 'four'"]),
    (["--strategy", "oft", "--set", "r=0", "--set", "oft_block_size=0"],
     ["invalid options for strategy 'oft'", "PEFT's OFTConfig refuses them"]),
    (["--strategy", "deft", "--set", "decomposition_method=svd"], ["decomposition_method must be one of relu, qr"]),
    (["--strategy", "loha", "--set", "peft_type=LORA"], ["unknown option 'peft_type' for strategy 'loha'"]),
    (["--strategy", "prompt-tuning", "--set", "tokenizer_name_or_path=gpt2"], ["unknown option 'tokenizer_name_or"]),
    (["--strategy", "loha@nf4"], ["strategy 'loha' cannot train on a nf4-quantized base (it supports: none)"]),
    (["--strategy", "cartridge", "--gradient-checkpointing"],
     ["strategy 'cartridge' cannot be combined with --gradient-checkpointing"]),
    (["--strategy", "adaption-prompt", "--model", "minilm-l6"],
     ["strategy 'adaption-prompt' cannot apply to bert models: PEFT's AdaptionPrompt knows only gpt2, llama, "
      "mistral models"]),
])
def test_what_peft_refuses_is_refused_before_anything_loads(args, needles, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(adapters.loading, "load_base_model", lambda *a, **k: pytest.fail("the base was loaded"))
    code, out, err = run_in_process(capsys, "train", *TINY, *args, "--output", str(tmp_path / "run"))
    assert_user_error(code, out, err, *needles)


def test_what_a_method_cannot_do_is_declared_with_the_reason():
    assert not isinstance(METHODS["prompt-tuning"], adapters.Merges)  # prompt learning has no weight to merge into
    assert "not a weight of the base" in METHODS["prompt-tuning"].merge_refusal
    assert not isinstance(METHODS["lily"], adapters.Merges) and "NotImplementedError" in METHODS["lily"].merge_refusal
    assert isinstance(METHODS["loha"], adapters.Merges) and isinstance(METHODS["ia3"], adapters.Merges)
    assert METHODS["cartridge"].supported_tasks == {"causal-lm"}
    for strategy in METHODS.values():  # every limit found by the kit is declared, and so refused up front
        for what, why in strategy.limits.items():
            if what == "merge":
                assert not isinstance(strategy, adapters.Merges) and strategy.merge_refusal == why
            elif what == "gradient-checkpointing":
                assert not strategy.supports_gradient_checkpointing
            else:
                assert what in (*adapters.TASKS, *adapters.QUANTIZATIONS), what
                assert what not in strategy.supported_tasks | strategy.supported_quantization


def test_sizes_made_for_large_models_fit_the_layers_they_target():
    from transformers import LlamaConfig, LlamaForCausalLM

    expected = {"tiny": {"c3a": 32, "vblora": 32, "road": 32, "waveft": 2048, "shira": 21},  # 64 wide, 32 for k/v
                "smollm2-135m": {"c3a": 192, "vblora": 192, "road": 64, "waveft": 2592, "shira": 32}}  # 576, 192
    option = {"c3a": "block_size", "vblora": "vector_length", "road": "group_size", "waveft": "n_frequency",
              "shira": "r"}
    for shape, sizes in expected.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**adapters.models.RANDOM_SHAPES[shape]))
        for name, size in sizes.items():
            strategy = METHODS[name]
            assert getattr(strategy.config_class(), option[name]) is None  # fitted unless set
            assert getattr(strategy.peft_config(model, strategy.config_class()), option[name]) == size, (shape, name)
        chosen = METHODS["c3a"].config_class(block_size=16)
        assert METHODS["c3a"].peft_config(model, chosen).block_size == 16


@pytest.mark.parametrize("name, options", [("loha", ["r=4"]), ("prompt-tuning", ["num_virtual_tokens=5"]),
                                           ("adaption-prompt", ["adapter_len=4"])])
def test_trains_by_name_and_saves_what_plain_peft_loads(name, options, tmp_path, capsys):
    from peft import PeftModel

    out = tmp_path / name
    sets = [a for o in options for a in ("--set", o)]
    code, stdout, err = run_in_process(capsys, "train", *TINY, "--strategy", name, *sets, "--max-steps", "2",
                                       "--output", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["strategy"] == name
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == METHODS[name].method.peft_type
    for option in options:
        key, value = option.split("=")
        assert saved[key] == int(value)
    ours = adapters.load(out)
    plain = PeftModel.from_pretrained(adapters.load_base_model("random:tiny").model, out)
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    for model in (ours.model, plain):
        model.eval()
    with torch.no_grad():
        assert torch.equal(ours.model(input_ids=ids).logits, plain(input_ids=ids).logits)


# --------------------------------------------------------------------------------------------
# The conformance kit over every method, against docs/strategies.md

# What depends on the method, on causal-lm and an unquantized base: apply, a training step, the counts,
# determinism, the save -> load round trip, gradient checkpointing and merging. Every layer tuner shares
# PeftStrategy's save and load with the built-in lora, whose kit runs pipeline and resume
# (test_plugin_kit.py); the methods that save otherwise (prompt learning) run those too.
CHECKS = ("declaration", "config-defaults", "apply", "train-step", "param-count", "determinism", "save-load",
          "gradient-checkpointing", "merge")


@pytest.fixture(scope="module")
def page_rows() -> dict[tuple[str, str], list[str]]:
    """docs/strategies.md's matrix: (strategy, task) -> its cells (none, nf4, fp4, int8, gradient checkpointing)."""
    rows = {}
    for line in matrix.readme_block(PAGE.read_text()).splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("`"):
            rows[cells[0].strip("`"), cells[1]] = cells[2:]
    return rows


def _failed(shown: str) -> set[str]:
    return set(shown.removeprefix("fails: ").split(", ")) if shown.startswith("fails: ") else set()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_kit_passes_every_method_but_its_declared_failures(name, monkeypatch, page_rows):
    strategy = METHODS[name]
    extra = () if strategy.method.kind == "layers" else ("pipeline", "resume")
    checks = {n: c for n, c in adapters.testing.runner.REGISTRY.items() if n in CHECKS + extra}
    monkeypatch.setattr(adapters.testing.runner, "REGISTRY", checks)  # the kit's own checks, fewer of them
    report = adapters.testing.run_checks(name, tasks=["causal-lm"], quantizations=["none"])
    assert {r.check for r in report.results} == set(checks)
    assert {r.check for r in report.failures} <= set(strategy.known_failures), report.table(failures_only=True)
    status, failed = matrix.cell(report, "causal-lm", "none")
    assert status in ("yes", "fails")
    # docs/strategies.md (every check, every cell) shows the same here, for the checks run here.
    assert set(failed) == _failed(page_rows[name, "causal-lm"][0]) & set(checks)


def test_strategies_page_lists_every_strategy_as_it_is_declared(page_rows):
    text = PAGE.read_text()
    block = matrix.readme_block(text)
    registry = adapters.get_registry()
    assert {name for name, _ in page_rows} == set(registry.names())
    for entry in registry.entries():
        s = entry.strategy
        options = json.loads(json.dumps(dataclasses.asdict(s.config_class())))
        bare = CheckReport(s.name, entry.plugin, sorted(s.supported_quantization), sorted(s.supported_tasks),
                           adapters.traits(s).supports_gradient_checkpointing, options, s.description)
        item = matrix.to_markdown([bare]).split("\n- ", 1)[1]  # its line below the legend
        assert f"\n- {item}" in block, f"docs/strategies.md is stale for {s.name}: run `ADAPTERS_LOAD_PLUGINS= " \
                                       "adapters matrix --readme docs/strategies.md`"
        known = set(getattr(s, "known_failures", {}))
        for task in adapters.TASKS:
            cells = page_rows[s.name, task]
            for quantization, shown in zip(adapters.QUANTIZATIONS, cells):
                if task in s.supported_tasks and quantization in s.supported_quantization:
                    assert shown == "yes" or _failed(shown) and _failed(shown) <= known, (s.name, task, quantization)
                else:
                    assert shown == "refused", (s.name, task, quantization)
            checkpointing = "yes" if adapters.traits(s).supports_gradient_checkpointing else "refused"
            assert cells[4] == (checkpointing if task in s.supported_tasks else "-"), (s.name, task)
    for peft_type, reason in plugin.NOT_REGISTERED.items():  # not offered, and why
        assert f"`{plugin.strategy_name(peft_type)}`" in text and reason in " ".join(text.split()), peft_type
