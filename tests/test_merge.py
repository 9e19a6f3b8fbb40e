"""adapters merge (issue 11): a trained run folded into its base, saved as a plain transformers checkpoint
that loads with no PEFT and no adapters code and gives the adapter model's logits within a stated,
recorded tolerance; QLoRA into a dequantized copy; prefix tuning, NaN weights and an output in the way
refused; the base on disk never touched; and the kit's merge check."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_plugin_kit import Norms
from test_store import apply, dot_entries, inputs, logits, tiny

import adapters
import adapters.testing
from adapters import merge as merging
from adapters.testing import plugin_for

from cli_helpers import assert_user_error, run_in_process


def saved_run(path: Path, name: str, seed: int = 1, model: str = "random:tiny", **load) -> Path:
    """A run of strategy ``name`` whose every trainable weight has moved as training would move it, saved."""
    base = adapters.load_base_model(model, **load)
    strategy, config, trained = apply(name, base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as far as the kit moves them: LoRA's B leaves zero, a head moves by a few percent
        for _, param in adapters.trainable_parameters(trained):
            param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return adapters.save(trained, path, strategy=strategy, config=config, base=base)


def plain(directory: Path, task: str = "causal-lm") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    return auto.from_pretrained(directory, dtype=torch.float32)


def within_record(got: torch.Tensor, expected: torch.Tensor, record: dict) -> float:
    """The largest difference, asserted within the tolerance the merge record states."""
    check = record["check"]
    difference = float((got.float() - expected.float()).abs().max())
    assert difference <= check["tolerance"] * max(1.0, float(expected.abs().max())), (difference, check)
    return difference


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------- LoRA, through the CLI

PLAIN_TRANSFORMERS = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("peft", "adapters"))
    print(json.dumps({"logits": out.tolist(), "dtype": str(model.dtype), "foreign": loaded}))
""")


def test_a_merged_lora_loads_in_a_fresh_process_with_plain_transformers_and_matches(tmp_path, capsys):
    run, out = saved_run(tmp_path / "run", "lora"), tmp_path / "merged"
    code, stdout, err = run_in_process(capsys, "merge", str(run), "--output", str(out), "--dtype", "fp32")
    assert code == 0, err
    assert f"Merged lora run {str(run)!r} into random:tiny: {out} (float32)" in stdout
    assert "AutoModelForCausalLM.from_pretrained" in stdout and "dequantized" not in stdout

    record = json.loads((out / "adapters.json").read_text())
    loaded = adapters.load(run)
    manifest = loaded.manifest
    assert record["kind"] == "merged-checkpoint" and record["dtype"] == "float32" and record["dequantized"] is False
    assert record["merged_from"]["strategy"] == "lora" and record["merged_from"]["fingerprint"] == manifest.fingerprint
    assert record["check"]["tolerance"] == 1e-4 and 0 <= record["check"]["max_difference"] < 1e-4
    assert sorted(record["files"]) == sorted(p.name for p in out.iterdir())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "peft" not in json.dumps(config).lower()

    ids = inputs(loaded.base)["input_ids"]
    expected = logits(loaded.model, {"input_ids": ids})
    base_logits = logits(tiny().model, {"input_ids": ids})
    assert float((expected - base_logits).abs().max()) > 1e-2  # the adapter moves the outputs
    done = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(out), json.dumps(ids.tolist())],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["foreign"] == [] and result["dtype"] == "torch.float32"
    within_record(torch.tensor(result["logits"]), expected, record)


# --------------------------------------------------------------------------------- QLoRA and the probe


def test_a_merged_qlora_goes_into_a_dequantized_copy_and_says_so_and_the_local_base_is_untouched(tmp_path, capsys):
    base_dir = tmp_path / "base"
    tiny().model.to(torch.bfloat16).save_pretrained(base_dir)  # a local base, stored in bf16
    before = tree_digest(base_dir)
    run = saved_run(tmp_path / "run", "qlora", model=str(base_dir), quantization="nf4")
    code, stdout, err = run_in_process(capsys, "merge", str(run), "--output", str(tmp_path / "merged"))
    assert code == 0, err
    assert "nf4-quantized base: merged into a copy dequantized to float32, saved as bfloat16" in stdout
    assert tree_digest(base_dir) == before  # the base on disk is only read

    out = tmp_path / "merged"
    record = json.loads((out / "adapters.json").read_text())
    assert record["dequantized"] is True and record["merged_from"]["quantization"] == "nf4"
    assert record["dtype"] == "bfloat16" and record["check"]["tolerance"] == 5e-2  # the base's own dtype by default
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    nf4 = adapters.load(run)  # the adapter as trained, on the nf4 base
    assert type(nf4.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    batch = {"input_ids": merging.heldout_batch(nf4.base.tokenizer, "causal-lm", torch.device("cpu"))["input_ids"]}
    merged = plain(out)
    assert not any(type(m).__module__.startswith(("bitsandbytes", "peft")) for m in merged.modules())
    within_record(logits(merged.float(), batch), logits(nf4.model, batch), record)


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
def test_a_merged_probe_is_the_base_with_its_trained_head(task, tmp_path):
    labels = ["negative", "positive"] if task != "causal-lm" else None
    run = saved_run(tmp_path / "run", "linear-probe", task=task, labels=labels)
    result = merging.merge_run(run, tmp_path / "merged", dtype="fp32")
    merged = plain(result.output, task)
    if task == "causal-lm":  # the probe trained an untied copy of lm_head: it stays apart from the embeddings
        assert merged.config.tie_word_embeddings is False
        assert not torch.equal(merged.lm_head.weight, merged.get_input_embeddings().weight)
    loaded = adapters.load(run)
    batch = inputs(loaded.base)
    record = json.loads((result.output / "adapters.json").read_text())
    assert within_record(logits(merged, batch), logits(loaded.model, batch), record) < 1e-5
    assert result.max_difference == record["check"]["max_difference"] < 1e-5


@pytest.mark.parametrize("dtype, tolerance", [("fp16", 1e-2), ("bf16", 5e-2)])
def test_a_half_precision_merge_is_stored_in_that_dtype_and_checked_at_its_tolerance(dtype, tolerance, tmp_path):
    run = saved_run(tmp_path / "run", "lora")
    result = merging.merge_run(run, tmp_path / "merged", dtype=dtype)
    wanted = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert {t.dtype for t in load_file(result.output / "model.safetensors").values()} == {wanted}
    assert result.tolerance == tolerance and 0 < result.relative_difference <= tolerance
    assert result.merge_difference < 1e-4 * result.scale  # the merge itself, before rounding, at the float32 tolerance


# --------------------------------------------------------------------------------- refusals


def test_prefix_tuning_is_refused_with_the_reason(tmp_path, capsys):
    run = saved_run(tmp_path / "run", "prefix-tuning")
    code, out, err = run_in_process(capsys, "merge", str(run), "--output", str(tmp_path / "merged"))
    assert_user_error(code, out, err, "strategy 'prefix-tuning' does not declare merging (adapters.Merges)",
                      "not weights of the base")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_adapter_weight_is_refused_in_one_line_before_any_model_loads(value, tmp_path, capsys,
                                                                                   monkeypatch):
    run = saved_run(tmp_path / "run", "lora")
    path = run / "adapter_model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[3]
    tensors[name][0, 0] = value
    save_file(tensors, path)
    monkeypatch.setattr(merging, "_dequantized_base", lambda *a: pytest.fail("a model was loaded"))
    code, out, err = run_in_process(capsys, "merge", str(run), "--output", str(tmp_path / "merged"))
    assert_user_error(code, out, err, f"weight {name} holds NaN or infinite values", "Train and save the run again")
    assert not (tmp_path / "merged").exists()


def test_an_output_in_the_way_is_refused_and_an_earlier_merge_is_replaced_with_overwrite(tmp_path, capsys):
    run = saved_run(tmp_path / "run", "lora")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "thesis.txt").write_text("mine")
    for args, needle in [((str(taken),), "directory exists and is not empty"),
                         ((str(taken), "--overwrite"), "holds thesis.txt"),
                         ((str(run), "--overwrite"), "holds the run being merged")]:
        code, out, err = run_in_process(capsys, "merge", str(run), "--output", *args)
        assert_user_error(code, out, err, needle)
    assert (taken / "thesis.txt").read_text() == "mine" and (run / "adapters.json").exists()
    merged = tmp_path / "merged"
    assert run_in_process(capsys, "merge", str(run), "--output", str(merged), "--dtype", "fp32")[0] == 0
    first = tree_digest(merged)
    code, out, err = run_in_process(capsys, "merge", str(run), "--output", str(merged))
    assert_user_error(code, out, err, "directory exists and is not empty")
    assert run_in_process(capsys, "merge", str(run), "--output", str(merged), "--dtype", "bf16", "--overwrite")[0] == 0
    assert tree_digest(merged) != first and json.loads((merged / "adapters.json").read_text())["dtype"] == "bfloat16"
    assert dot_entries(tmp_path) == []


class DropsTheAdapter(Norms):
    """Merges by throwing its trained weights away: the merged model is the base."""

    name = "kit-drops-adapter"

    def merge(self, model, config):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
        return model


def test_a_merge_that_changes_the_outputs_keeps_nothing(tmp_path, register_plugin):
    register_plugin(plugin_for(DropsTheAdapter()), name="drops-adapter-plugin")
    run = saved_run(tmp_path / "run", "kit-drops-adapter")
    with pytest.raises(adapters.AdaptersError, match="its merge changes the logits on held-out text"):
        merging.merge_run(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and dot_entries(tmp_path) == []


def test_a_checkpoint_beyond_its_tolerance_after_reload_keeps_nothing(tmp_path, monkeypatch):
    run = saved_run(tmp_path / "run", "lora")
    monkeypatch.setitem(merging.TOLERANCES, torch.bfloat16, 1e-9)  # rounding to bf16 now exceeds it
    with pytest.raises(adapters.AdaptersError, match="reloaded with transformers, gives logits .* beyond the "
                                                     "bfloat16 tolerance"):
        merging.merge_run(run, tmp_path / "merged", dtype="bf16")
    assert not (tmp_path / "merged").exists() and dot_entries(tmp_path) == []


# --------------------------------------------------------------------------------- the kit's merge check


def test_the_kit_checks_merging_only_where_it_is_declared(register_plugin):
    one = {"tasks": ["causal-lm"], "quantizations": ["none"]}
    broken = adapters.testing.run_checks(DropsTheAdapter(), **one)
    assert {r.check for r in broken.failures} == {"merge"}, broken.table()
    assert "its merge changes the logits" in broken.failures[0].detail
    without = adapters.testing.run_checks(Norms(), **one)
    row = next(r for r in without.results if r.check == "merge")
    assert without.passed and row.status == "skip" and row.detail == "does not declare adapters.Merges"
