"""Named models: the real embedded ones, random shapes, quantized loading, parameter counting."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import adapters
from adapters.loading import ByteTokenizer, TokenizerFallback
from adapters.models import MODELS, model_status, quiet_transformers, random_config, resolve_model

from cli_helpers import assert_user_error, run_in_process


def test_smollm2_is_the_real_model(smollm2):
    """The converted cache holds the real SmolLM2: greedy decoding knows the capital of France."""
    tok = smollm2.tokenizer
    ids = torch.tensor([tok.encode("The capital of France is", add_special_tokens=False)])
    with torch.no_grad():
        out = smollm2.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                     do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:].tolist())
    assert (adapters.models.cache_dir() / "smollm2-135m" / "model.safetensors").exists()


def test_minilm_is_the_real_model():
    """The real all-MiniLM-L6-v2: related sentences embed closer than unrelated ones."""
    base = adapters.load_base_model("minilm-l6", task="sequence-classification", labels=["a", "b"])
    encoder = base.model.base_model

    def embed(text):
        enc = base.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(**enc).last_hidden_state
        return torch.nn.functional.normalize(hidden.mean(1), dim=-1)[0]

    cat, kitten, tax = embed("A cat sits on the mat."), embed("A kitten rests on a rug."), embed("Tax law changed.")
    assert cat @ kitten > cat @ tax + 0.2


def test_llama_1b_shape_is_published_one():
    from transformers import AutoModelForCausalLM

    config = random_config("llama-1b")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (2048, 8192, 16)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 128256)
    assert config.tie_word_embeddings
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # Llama-3.2-1B has 1.236 B parameters.
    assert abs(adapters.count_parameters(model).total - 1_235_814_400) < 1_000


def test_llama_8b_shape_counts_8b_parameters():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_config("llama-8b"))
    assert abs(adapters.count_parameters(model).total - 8_030_261_248) < 1_000


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_quantized_load_keeps_the_logical_parameter_count(quantization):
    plain = adapters.load_base_model("random:tiny")
    quantized = adapters.load_base_model("random:tiny", quantization=quantization)
    assert adapters.count_parameters(quantized.model).total == adapters.count_parameters(plain.model).total
    kinds = {type(m).__name__ for m in quantized.model.modules()}
    assert {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}[quantization] in kinds
    # Heads stay unquantized so probes and classifiers train in the compute dtype.
    assert type(quantized.model.lm_head) is torch.nn.Linear


# ------------------------------------------------------------------------ fingerprints (item 3)


@pytest.fixture(scope="module")
def untied_bases(tmp_path_factory):
    """Three random:tiny-shaped checkpoints with an untied lm_head: one, the same with one q_proj tensor
    changed, and the same with the lm_head changed."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("untied")
    config = random_config("tiny")
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / "base")
        with torch.no_grad():
            model.model.layers[1].self_attn.q_proj.weight[0, 0] += 1e-3
        model.save_pretrained(root / "q_proj")
        with torch.no_grad():
            model.model.layers[1].self_attn.q_proj.weight[0, 0] -= 1e-3
            model.lm_head.weight[5, 7] += 1e-3
        model.save_pretrained(root / "lm_head")
    return {name: root / name for name in ("base", "q_proj", "lm_head")}


def test_fingerprint_covers_every_tensor(untied_bases):
    """One q_proj value or one value of an untied lm_head changes it; 0.1's weak one saw neither."""
    prints = {name: adapters.fingerprint(path) for name, path in untied_bases.items()}
    assert len(set(prints.values())) == 3
    assert all(p.startswith("sha256:") for p in prints.values())
    loaded = {name: adapters.load_base_model(str(path)) for name, path in untied_bases.items()}
    assert {name: base.fingerprint for name, base in loaded.items()} == prints
    assert len({base.weak_fingerprint for base in loaded.values()}) == 1


def test_fingerprint_ignores_quantization_and_dtype(untied_bases):
    path = str(untied_bases["base"])
    fp32 = adapters.load_base_model(path)
    nf4 = adapters.load_base_model(path, quantization="nf4")
    bf16 = adapters.load_base_model(path, dtype=torch.bfloat16)
    assert any(type(m).__name__ == "Linear4bit" for m in nf4.model.modules())
    assert fp32.fingerprint == nf4.fingerprint == bf16.fingerprint == adapters.fingerprint(path)
    assert fp32.weak_fingerprint == nf4.weak_fingerprint == bf16.weak_fingerprint


def test_fingerprint_cache_follows_the_files(untied_bases, tmp_path, monkeypatch):
    """Cached by path, size and modification time: a file rewritten in place is hashed again."""
    monkeypatch.setenv("ADAPTERS_CACHE_DIR", str(tmp_path / "cache"))
    copy = shutil.copytree(untied_bases["base"], tmp_path / "copy")
    assert adapters.fingerprint(copy) == adapters.fingerprint(untied_bases["base"])
    assert (tmp_path / "cache" / "fingerprints.json").exists()
    weights = copy / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    shutil.copyfile(untied_bases["q_proj"] / "model.safetensors", weights)  # same size, other bytes
    os.utime(weights, ns=(mtime + 10**9, mtime + 10**9))
    assert adapters.fingerprint(copy) == adapters.fingerprint(untied_bases["q_proj"])


def test_saves_from_0_1_are_checked_against_the_weak_fingerprint():
    from adapters.loading import base_fingerprint, is_weak_fingerprint

    base = adapters.load_base_model("random:tiny")
    assert is_weak_fingerprint(base.weak_fingerprint) and not is_weak_fingerprint(base.fingerprint)
    assert base_fingerprint(base, "0123456789abcdef") == base.weak_fingerprint
    assert base_fingerprint(base, base.fingerprint) == base.fingerprint
    assert adapters.fingerprint(base.model) == base.fingerprint  # of the files it was loaded from


def test_new_weights_are_what_the_checkpoint_lacked():
    assert adapters.load_base_model("random:tiny").new_weights == []
    seq = adapters.load_base_model("random:tiny", task="sequence-classification", labels=["a", "b"])
    assert seq.new_weights == ["score.weight"]


def test_unknown_model_and_task_errors_name_the_input():
    with pytest.raises(adapters.AdaptersError, match="unknown model 'smollm3'.*smollm2-135m"):
        resolve_model("smollm3")
    with pytest.raises(adapters.AdaptersError, match="random:llama-1b"):
        resolve_model("random:llama-2b")
    with pytest.raises(adapters.AdaptersError, match="minilm-l6.*causal-lm"):
        adapters.load_base_model("minilm-l6", task="causal-lm")
    with pytest.raises(adapters.AdaptersError, match="quantization 'q3'"):
        adapters.load_base_model("random:tiny", quantization="q3")


def test_local_checkpoint_needing_remote_code_is_refused(tmp_path):
    base = adapters.load_base_model("random:tiny")
    base.model.config.auto_map = {"AutoModelForCausalLM": "evil.Model"}
    base.model.save_pretrained(tmp_path)
    with pytest.raises(adapters.AdaptersError, match="remote code"):
        adapters.load_base_model(str(tmp_path))


def test_models_listing_covers_every_name():
    rows = {r["name"]: r for r in model_status()}
    assert set(rows) == set(MODELS)
    assert rows["minilm-l6"]["available"] and rows["minilm-l6"]["tasks"] == ["sequence-classification"]
    assert {"random:llama-1b", "random:llama-8b", "random:smollm2-135m"} <= set(rows)


def test_byte_tokenizer_round_trips_text():
    tok = ByteTokenizer()
    ids = tok.encode("déjà vu")
    assert min(ids) > tok.eos_token_id and tok.decode(ids) == "déjà vu"


# ------------------------------------------------------------------------ remote code (item 2)

EVIL = """
from pathlib import Path
Path({sentinel!r}).write_text("remote code ran")
"""


def _tiny_folder(path):
    """A copy of the random:tiny checkpoint (config.json and model.safetensors), as a local model folder."""
    return shutil.copytree(MODELS["random:tiny"].locate(), path)


def _remote_code_folder(tmp_path, where: str):
    sentinel = tmp_path / "SENTINEL"
    folder = tmp_path / "model"
    if where == "config.json":
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({
            "model_type": "evil-model",
            "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    else:
        _tiny_folder(folder)
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (folder / "evil.py").write_text(EVIL.format(sentinel=str(sentinel)))
    return folder, sentinel


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_remote_code_never_runs_even_when_the_user_says_yes(where, tmp_path):
    """transformers asks on stdin whether to run a model's own code; "y" piped in must change nothing."""
    folder, sentinel = _remote_code_folder(tmp_path, where)
    env = {**os.environ, "ADAPTERS_LOAD_PLUGINS": "", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-m", "adapters", "train", "--model", str(folder), "--strategy",
                           "linear-probe", "--max-steps", "1"], input="y\n", capture_output=True, text=True,
                          env=env, timeout=300)
    assert_user_error(proc.returncode, proc.stdout, proc.stderr, f"{where} has an auto_map", "remote code")
    assert not sentinel.exists()


def test_remote_code_is_refused_by_plan_and_the_api(tmp_path, capsys):
    folder, sentinel = _remote_code_folder(tmp_path, "tokenizer_config.json")
    code, out, err = run_in_process(capsys, "plan", "--model", str(folder), "--strategies", "lora", "--device", "cpu")
    assert_user_error(code, out, err, "tokenizer_config.json has an auto_map")
    with pytest.raises(adapters.AdaptersError, match="remote code"):
        adapters.load_base_model(str(folder))
    assert not sentinel.exists()


# ------------------------------------------------------------------------ broken model folders (item 11)


def _garbage_config(folder):
    (folder / "config.json").write_text("{not json")


def _unknown_model_type(folder):
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-model", "hidden_size": 64}))


def _missing_weights(folder):
    (folder / "model.safetensors").unlink()


def _truncated_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _only_pickled_weights(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")


BROKEN_CONFIG = {
    "garbage config.json": (_garbage_config, "config.json is not valid JSON"),
    "unknown model_type": (_unknown_model_type, "model_type 'no-such-model'"),
}
BROKEN_WEIGHTS = {
    "missing weights": (_missing_weights, "no model.safetensors"),
    "truncated weights": (_truncated_weights, "model.safetensors is truncated"),
    "only pytorch_model.bin": (_only_pickled_weights, "only pickled weights (pytorch_model.bin)"),
}


def _broken_run(case, command, tmp_path, capsys):
    breaks, message = {**BROKEN_CONFIG, **BROKEN_WEIGHTS}[case]
    folder = _tiny_folder(tmp_path / "model")
    breaks(folder)
    args = ["--max-steps", "1", "--eval-batches", "0"] if command == "train" else ["--device", "cpu"]
    return folder, message, run_in_process(capsys, command, "--model", str(folder), "--strategy", "lora", *args)


@pytest.mark.parametrize("command", ["train", "plan"])
@pytest.mark.parametrize("case", list(BROKEN_CONFIG))
def test_broken_model_config_is_one_clear_error(case, command, tmp_path, capsys):
    folder, message, result = _broken_run(case, command, tmp_path, capsys)
    assert_user_error(*result, f"--model {folder}", message)


@pytest.mark.parametrize("case", list(BROKEN_WEIGHTS))
def test_broken_model_weights_are_one_clear_error_before_loading(case, tmp_path, capsys, no_weights_load):
    """train refuses them before loading; plan, which reads only config.json, still plans."""
    folder, message, result = _broken_run(case, "train", tmp_path, capsys)
    assert_user_error(*result, f"--model {folder}", message)
    code, out, err = _broken_run(case, "plan", tmp_path / "plan", capsys)[2]
    assert code == 0, err


# ------------------------------------------------------------------------ checks before loading (item 8)


def _refuse_to_load(*args, **kwargs):
    raise AssertionError("weights were loaded")


@pytest.fixture
def no_weights_load(monkeypatch):
    """Any attempt to load a checkpoint's weights fails the test."""
    monkeypatch.setattr(adapters.loading, "_load", _refuse_to_load)


def test_target_modules_matching_nothing_fail_before_loading(capsys, no_weights_load):
    code, out, err = run_in_process(capsys, "train", "--model", "random:tiny", "--strategy", "lora",
                                    "--set", "target_modules=q_proj,attention", "--max-steps", "1")
    assert_user_error(code, out, err, "target_modules attention match no linear layer", "q_proj")


def test_classification_checkpoint_with_other_label_count_fails_before_loading(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    config = random_config("tiny")
    config.num_labels = 3
    with quiet_transformers():
        AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "classifier")
    folder = str(tmp_path / "classifier")
    assert resolve_model(folder).default_task == "sequence-classification"
    # With as many labels, the checkpoint's trained head loads: nothing is new.
    with pytest.warns(TokenizerFallback):
        assert adapters.load_base_model(folder, labels=["a", "b", "c"]).new_weights == []

    monkeypatch.setattr(adapters.loading, "_load", _refuse_to_load)
    code, out, err = run_in_process(capsys, "train", "--model", folder, "--strategy", "linear-probe",
                                    "--max-steps", "1")  # the built-in classification data has 6 labels
    assert_user_error(code, out, err, "checkpoint with 3 labels, but the data has 6")
    with pytest.raises(adapters.AdaptersError, match="3 labels, but the data has 2"):
        adapters.load_base_model(folder, labels=["a", "b"])


# ------------------------------------------------------------------------ tokenizers (item 12)


def _gemma_folder(path):
    """A tiny random Gemma2 checkpoint, without tokenizer files."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, vocab_size=300)
    with quiet_transformers():
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_folder_without_tokenizer_files_gets_the_byte_tokenizer_announced(family, tmp_path):
    """Never the stand-in transformers builds from a Gemma config, which maps every text to [3]."""
    folder = _tiny_folder(tmp_path / "model") if family == "llama" else _gemma_folder(tmp_path / "model")
    with pytest.warns(TokenizerFallback, match="no tokenizer files, so text becomes UTF-8 bytes"):
        base = adapters.load_base_model(str(folder))
    assert isinstance(base.tokenizer, ByteTokenizer)


def test_a_tokenizer_mapping_text_to_almost_nothing_is_refused(tmp_path, capsys):
    """Tokenizer files saved from that stand-in: refused, before the weights load."""
    from transformers import AutoTokenizer

    folder = _gemma_folder(tmp_path / "gemma")
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    with pytest.raises(adapters.AdaptersError, match="maps real text to 1 distinct token id"):
        adapters.load_base_model(str(folder))
    code, out, err = run_in_process(capsys, "train", "--model", str(folder), "--strategy", "lora", "--max-steps", "1")
    assert_user_error(code, out, err, "maps real text to 1 distinct token id", "tokenizer files")
