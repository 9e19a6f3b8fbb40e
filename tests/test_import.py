"""adapters import (issue 11): a directory saved by plain PEFT becomes a complete adapters run that loads
to PEFT's own logits, evaluates and merges; its weights are checked against the base (keys, shapes,
finite values, no pickles) and the file's keys against what the strategy can express."""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from test_store import Payload, inputs, logits
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

import adapters
from adapters import importing
from adapters.merge import merge_run, reload

from cli_helpers import assert_user_error, run_in_process


def checkpoint() -> Path:
    return adapters.models.MODELS["random:tiny"].locate()


def plain_base(task: str = "causal-lm") -> torch.nn.Module:
    with adapters.models.quiet_transformers():  # no progress bar on stderr, where the CLI's one line is checked
        if task == "causal-lm":
            return AutoModelForCausalLM.from_pretrained(checkpoint(), dtype=torch.float32)
        return AutoModelForSequenceClassification.from_pretrained(checkpoint(), dtype=torch.float32, num_labels=2)


def peft_dir(path: Path, peft_config, model: torch.nn.Module | None = None, seed: int = 0) -> Path:
    """What a PEFT user saves: get_peft_model on the base, trained (here: every adapter weight moved), saved."""
    with warnings.catch_warnings():  # PEFT's FutureWarning under transformers 5, on stderr where the CLI's line is
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model if model is not None else plain_base(), peft_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(path)
    return path


def peft_logits(directory: Path, batch: dict[str, torch.Tensor], task: str = "causal-lm") -> torch.Tensor:
    return logits(PeftModel.from_pretrained(plain_base(task), directory), batch)


def test_a_plain_peft_lora_is_imported_evaluated_and_merged(tmp_path, capsys):
    from adapters.training import evaluate, make_accelerator, make_batches

    source = peft_dir(tmp_path / "peft", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    task_type="CAUSAL_LM"))
    run = tmp_path / "run"
    code, out, err = run_in_process(capsys, "import", str(source), "--model", "random:tiny", "--output", str(run))
    assert code == 0, err
    assert "Imported a PEFT LORA adapter as a lora run (r=4 alpha=8 dropout=0.0 target_modules=['q_proj', " \
           "'v_proj'] use_dora=False use_rslora=False init=default lora_plus_ratio=1.0) on random:tiny" in out
    loaded = adapters.load(run)  # a complete run: manifest, PEFT's files, the fingerprint of the base
    assert loaded.strategy.name == "lora" and loaded.manifest.fingerprint == loaded.base.fingerprint
    assert loaded.manifest.training["imported_from"]["peft_type"] == "LORA"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(loaded.manifest.files)
    batch = inputs(loaded.base)
    expected = peft_logits(source, batch)
    assert torch.equal(logits(loaded.model, batch), expected)

    # Evaluated as a trained run is: held-out loss on the built-in text, the same as PEFT's own model gives.
    heldout = make_batches(adapters.data.default_dataset("causal-lm").heldout, loaded.base, 32, "held-out")
    loader = torch.utils.data.DataLoader(heldout, batch_size=2)
    ours = evaluate(loaded.model, loader, "causal-lm", make_accelerator(), 2)
    theirs = evaluate(PeftModel.from_pretrained(plain_base(), source), loader, "causal-lm", make_accelerator(), 2)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6) and ours["perplexity"] > 1

    result = merge_run(run, tmp_path / "merged", dtype="fp32")
    merged = reload(result.output, "causal-lm", torch.device("cpu"))
    assert float((logits(merged, batch) - expected).abs().max()) <= result.tolerance * result.scale


def test_training_continues_from_an_imported_run(tmp_path, capsys):
    source = peft_dir(tmp_path / "peft", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    run = tmp_path / "run"
    importing.import_peft(source, "random:tiny", run)
    before = adapters.load(run)
    batch = inputs(before.base)
    code, out, err = run_in_process(capsys, "train", "--resume", str(run), "--max-steps", "1", "--batch-size", "2",
                                    "--seq-len", "32", "--eval-batches", "1", "--learning-rate", "1e-2")
    assert code == 0, err
    after = adapters.load(run)
    assert after.strategy.name == "lora" and after.config == before.config
    assert not torch.equal(logits(after.model, batch), logits(before.model, batch))
    # From the imported weights, not from a fresh start: AdamW's first step moves each weight by the learning rate.
    old, new = dict(adapters.trainable_parameters(before.model)), dict(adapters.trainable_parameters(after.model))
    assert old.keys() == new.keys()
    assert max(float((new[n] - old[n]).abs().max()) for n in old) <= 1.01e-2


def test_an_adapter_saved_without_a_task_type_imports_for_the_class_peft_recorded(tmp_path):
    source = peft_dir(tmp_path / "peft", LoraConfig(r=4, target_modules=["q_proj"]))  # no task_type
    recorded = json.loads((source / "adapter_config.json").read_text())["auto_mapping"]
    assert recorded["parent_library"].startswith("transformers.")  # PEFT names the class instead
    result = importing.import_peft(source, "random:tiny", tmp_path / "run")
    assert result.task == "causal-lm"
    loaded = adapters.load(tmp_path / "run")
    batch = inputs(loaded.base)
    assert torch.equal(logits(loaded.model, batch), peft_logits(source, batch))


def test_a_plain_peft_classification_lora_imports_with_its_head(tmp_path):
    source = peft_dir(tmp_path / "peft", LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"),
                      model=plain_base("sequence-classification"))
    result = importing.import_peft(source, "random:tiny", tmp_path / "run")
    assert result.task == "sequence-classification" and result.strategy == "lora"
    loaded = adapters.load(tmp_path / "run")
    assert loaded.manifest.labels == ["LABEL_0", "LABEL_1"]  # as many as the saved head has rows
    batch = inputs(loaded.base)
    assert torch.equal(logits(loaded.model, batch), peft_logits(source, batch, "sequence-classification"))


@pytest.mark.parametrize("projection", [False, True])
def test_a_plain_peft_prefix_tuning_dir_imports(projection, tmp_path):
    source = peft_dir(tmp_path / "peft", PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=projection,
                                                            task_type="CAUSAL_LM"))
    result = importing.import_peft(source, "random:tiny", tmp_path / "run")
    assert (result.strategy, result.options) == ("prefix-tuning", {"num_virtual_tokens": 5, "projection": projection})
    loaded = adapters.load(tmp_path / "run")
    batch = inputs(loaded.base)
    assert torch.equal(logits(loaded.model, batch), peft_logits(source, batch))


def test_a_plain_peft_ia3_dir_imports_with_the_builtin_ia3_and_merges(tmp_path):
    source = peft_dir(tmp_path / "peft", IA3Config(task_type="CAUSAL_LM"))  # PEFT's own targets for Llama
    result = importing.import_peft(source, "random:tiny", tmp_path / "run")
    assert result.strategy == "ia3" and result.options["feedforward_modules"] == "down_proj"
    assert sorted(result.options["target_modules"].split(",")) == ["down_proj", "k_proj", "v_proj"]
    loaded = adapters.load(tmp_path / "run")
    batch = inputs(loaded.base)
    expected = peft_logits(source, batch)
    assert torch.equal(logits(loaded.model, batch), expected)
    merged = merge_run(tmp_path / "run", tmp_path / "merged", dtype="fp32")
    plain = reload(merged.output, "causal-lm", torch.device("cpu"))
    assert float((logits(plain, batch) - expected).abs().max()) <= merged.tolerance * merged.scale


# --------------------------------------------------------------------------------- refusals


def test_a_base_with_other_shapes_is_refused_naming_the_parameter(tmp_path, capsys):
    narrow = LlamaConfig(**{**adapters.models.RANDOM_SHAPES["tiny"], "hidden_size": 32, "head_dim": 8})
    source = peft_dir(tmp_path / "peft", LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
                      model=LlamaForCausalLM(narrow))
    code, out, err = run_in_process(capsys, "import", str(source), "--model", "random:tiny", "--output",
                                    str(tmp_path / "run"))
    assert_user_error(code, out, err, "does not fit --model random:tiny",
                      "parameter base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape (4, 32) "
                      "in the file but (4, 64) in the model")
    assert not (tmp_path / "run").exists()


def test_a_dir_with_only_pickled_weights_is_refused_unread(tmp_path, capsys):
    source = peft_dir(tmp_path / "peft", LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    (source / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (source / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    code, out, err = run_in_process(capsys, "import", str(source), "--model", "random:tiny", "--output",
                                    str(tmp_path / "run"))
    assert_user_error(code, out, err, "holds only pickled weights (adapter_model.bin)", "never unpickles")
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, needle", [
    ({"auto_mapping": {"base_model_class": "Evil", "parent_library": "evil"}}, "holds 'auto_mapping'"),
    ({"auto_map": {"AutoModel": "evil.Model"}}, "holds 'auto_map'"),
    ({"bias": "all"}, "has bias='all', which strategy 'lora' has no option for"),
    ({"rank_pattern": {"q_proj": 8}}, "has rank_pattern={'q_proj': 8}"),
    ({"target_modules": ".*q_proj"}, "target_modules='.*q_proj', a regular expression"),
    ({"init_lora_weights": "pissa"}, "changes the base's own weights"),
    ({"lora_alpha": 8.5}, "option 'alpha' takes an integer, not 8.5"),
    ({"a_key_from_a_newer_peft": "on"}, "has a_key_from_a_newer_peft='on'"),
    ({"peft_type": "XLORA"}, "a PEFT XLORA adapter, which no installed strategy reads (they read: "),
    ({"task_type": "SEQ_2_SEQ_LM"}, "task_type 'SEQ_2_SEQ_LM', which adapters does not train"),
])
def test_what_a_strategy_cannot_express_is_refused_naming_the_key(change, needle, tmp_path, capsys, monkeypatch):
    source = peft_dir(tmp_path / "peft", LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    path = source / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    monkeypatch.setattr(adapters.loading, "load_base_model", lambda *a, **k: pytest.fail("the base was loaded"))
    code, out, err = run_in_process(capsys, "import", str(source), "--model", "random:tiny", "--output",
                                    str(tmp_path / "run"))
    assert_user_error(code, out, err, needle)
