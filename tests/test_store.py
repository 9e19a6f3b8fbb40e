"""Tests for adapters.store: atomic saves, strict loads, manifests and base identity.

Covers reliability.md rows 1, 2, 4, 5, 6, 7, 18 and 21 on the tiny random Llama (``random:tiny``),
with the real MiniLM (BERT) where a real sequence-classification model adds something.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import pickletools
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters
from adapters import store
from adapters.nn import trainable_parameters
from adapters.options import build_config

STRATEGIES = ("lora", "prefix-tuning", "linear-probe", "full-finetune")
PEFT_STRATEGIES = ("lora", "prefix-tuning")
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
DEFAULT_FILES = {"weights.safetensors"}
LABELS = ["negative", "positive"]


# ---------------------------------------------------------------------------------------------- helpers


def tiny(**kwargs) -> adapters.BaseModel:
    return adapters.load_base_model("random:tiny", **kwargs)


def apply(name: str, base: adapters.BaseModel, **options):
    strategy = adapters.get_strategy(name)
    config = build_config(strategy.config_class, options, name)
    return strategy, config, strategy.apply(base.model, config)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable weight away from what a fresh apply gives (LoRA's B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in trainable_parameters(model):
            param.add_(0.5 * torch.randn(param.shape, generator=gen).to(param.dtype))


def inputs(base: adapters.BaseModel) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    vocab = base.model.config.vocab_size
    ids = torch.randint(3, vocab, (2, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**batch).logits.detach().clone()


def trained_save(path: Path, name: str = "linear-probe", seed: int = 1, overwrite: bool = False, **options):
    """A perturbed model saved to ``path``; returns (logits before saving, inputs)."""
    base = tiny()
    strategy, config, model = apply(name, base, **options)
    perturb(model, seed)
    batch = inputs(base)
    expected = logits(model, batch)
    adapters.save(model, path, strategy=strategy, config=config, base=base, overwrite=overwrite)
    return expected, batch


def dot_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def edit_manifest(directory: Path, change) -> None:
    path = directory / store.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


class Payload:
    """Unpickling this creates ``path``; it is only ever pickled here, never unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail if anything calls torch.load or pickle loaders (weights_only could hide a torch.load)."""
    calls = []

    def forbidden(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called on a user file")
        return call

    monkeypatch.setattr(torch, "load", forbidden("torch.load"))
    monkeypatch.setattr(pickle, "load", forbidden("pickle.load"))
    monkeypatch.setattr(pickle, "loads", forbidden("pickle.loads"))
    return calls


@pytest.fixture(scope="module")
def other_checkpoints(tmp_path_factory):
    """Local checkpoints: random:tiny's shapes with other weights, and two other shapes."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bases")
    same_shape = tiny()
    emb = same_shape.model.get_input_embeddings().weight
    with torch.no_grad():
        emb.add_(0.01 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(7)))
    same_shape.model.save_pretrained(root / "same-shape")
    dirs = {"same-shape": root / "same-shape"}
    for label, change in {"hidden_size": dict(hidden_size=32, head_dim=8),
                          "num_hidden_layers": dict(num_hidden_layers=1)}.items():
        config = adapters.models.random_config("tiny")
        for key, value in change.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / label)
        dirs[label] = root / label
    return dirs


# ---------------------------------------------------------------------------------- round trip (row 21)


@pytest.mark.parametrize("name", STRATEGIES)
def test_round_trip_reproduces_logits_and_writes_only_expected_files(name, tmp_path, no_unpickling):
    out = tmp_path / "out"
    expected, batch = trained_save(out, name)

    assert set(p.name for p in out.iterdir()) == (
        (PEFT_FILES if name in PEFT_STRATEGIES else DEFAULT_FILES) | {store.MANIFEST}
    )
    assert dot_entries(tmp_path) == []

    loaded = adapters.load(out)
    assert loaded.strategy.name == name
    assert loaded.config == adapters.get_strategy(name).config_class()
    assert torch.equal(logits(loaded.model, batch), expected)

    # The weights that came back are the saved ones, not a fresh apply's.
    assert no_unpickling == []  # torch.load can read safetensors too: it must not be used at all

    _, _, fresh = apply(name, tiny())
    assert not torch.allclose(logits(fresh, batch), expected)


@pytest.mark.parametrize("name, options", [
    ("lora", {"r": "4", "alpha": "8", "target_modules": "q_proj,v_proj"}),
    ("lora", {"target_modules": ["k_proj", "down_proj"]}),
    ("prefix-tuning", {"num_virtual_tokens": "3"}),
])
def test_round_trip_with_non_default_options(name, options, tmp_path):
    expected, batch = trained_save(tmp_path / "out", name, **options)
    loaded = adapters.load(tmp_path / "out")
    assert loaded.config == build_config(loaded.strategy.config_class, options, name)
    assert torch.equal(logits(loaded.model, batch), expected)


def test_round_trip_prefix_tuning_with_projection(tmp_path):
    expected, batch = trained_save(tmp_path / "out", "prefix-tuning", projection="true", num_virtual_tokens="4")
    loaded = adapters.load(tmp_path / "out")
    # Saved as the MLP's output, so equal up to float rounding of that MLP.
    torch.testing.assert_close(logits(loaded.model, batch), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["lora", "linear-probe"])
def test_round_trip_sequence_classification_on_real_bert(name, tmp_path):
    """MiniLM's classifier head is freshly initialised at every load: the save must carry it."""
    base = adapters.load_base_model("minilm-l6", labels=LABELS)
    strategy, config, model = apply(name, base)
    perturb(model, 3)
    batch = inputs(base)
    expected = logits(model, batch)
    adapters.save(model, tmp_path / "out", strategy=strategy, config=config, base=base)

    manifest = json.loads((tmp_path / "out" / store.MANIFEST).read_text())
    assert manifest["task"] == "sequence-classification"
    assert manifest["labels"] == LABELS

    loaded = adapters.load(tmp_path / "out")
    assert loaded.base.labels == LABELS
    assert torch.equal(logits(loaded.model, batch), expected)
    _, _, fresh = apply(name, adapters.load_base_model("minilm-l6", labels=LABELS))
    assert not torch.allclose(logits(fresh, batch), expected)


@pytest.mark.parametrize("name", PEFT_STRATEGIES)
def test_peft_saves_load_with_plain_peft(name, tmp_path):
    from peft import PeftModel

    expected, batch = trained_save(tmp_path / "out", name)
    model = PeftModel.from_pretrained(tiny().model, tmp_path / "out")
    assert torch.equal(logits(model, batch), expected)


def test_load_onto_a_given_base_by_name_and_object(tmp_path):
    expected, batch = trained_save(tmp_path / "out", "lora")
    assert torch.equal(logits(adapters.load(tmp_path / "out", base="random:tiny").model, batch), expected)
    given = tiny()
    loaded = adapters.load(tmp_path / "out", base=given)
    assert loaded.base is given
    assert torch.equal(logits(loaded.model, batch), expected)


def test_trained_save_manifest_and_reload(tmp_path):
    out = tmp_path / "run"
    settings = adapters.TrainSettings(model="random:tiny", strategy="lora", max_steps=2, batch_size=2, seq_len=32,
                                      eval_batches=1, output=str(out), options={"r": "4"})
    result = adapters.train(settings, progress=False)
    assert result.output == out

    manifest = json.loads((out / store.MANIFEST).read_text())
    assert manifest["training"]["max_steps"] == 2
    assert manifest["training"]["options"] == {"r": "4"}
    assert manifest["config"]["r"] == 4
    assert "output" not in manifest["training"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "training" is a known key: no warning
        loaded = adapters.load(out)

    base = tiny()
    batch = inputs(base)
    _, _, fresh = apply("lora", base, r="4")
    assert not torch.equal(logits(loaded.model, batch), logits(fresh, batch))


# ------------------------------------------------------------------------------------------- manifest


@pytest.mark.parametrize("name", ["lora", "full-finetune"])
def test_manifest_content(name, tmp_path):
    import dataclasses

    import peft
    import safetensors
    import transformers

    from adapters.loading import architecture

    base = tiny()
    strategy, config, model = apply(name, base)
    adapters.save(model, tmp_path / "out", strategy=strategy, config=config, base=base)
    text = (tmp_path / "out" / store.MANIFEST).read_text()
    manifest = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))

    assert manifest["format_version"] == store.FORMAT_VERSION
    assert manifest["strategy"] == name
    assert manifest["config"] == dataclasses.asdict(config)
    assert manifest["base_model"] == "random:tiny"
    assert manifest["quantization"] == "none"
    assert manifest["task"] == "causal-lm"
    assert manifest["fingerprint"] == base.fingerprint == adapters.fingerprint(tiny().model)
    assert manifest["shape"] == architecture(tiny().model)
    assert manifest["shape"]["hidden_size"] == tiny().model.config.hidden_size
    assert set(manifest["files"]) | {store.MANIFEST} == {p.name for p in (tmp_path / "out").iterdir()}
    versions = manifest["versions"]
    assert versions["torch"] == torch.__version__
    assert versions["transformers"] == transformers.__version__
    assert versions["peft"] == peft.__version__
    assert versions["safetensors"] == safetensors.__version__
    assert "adapters" in versions


@pytest.mark.parametrize("where, key", [
    ("top", "trust_remote_code"), ("config", "trust_remote_code"), ("top", "auto_map"), ("config", "auto_map"),
])
def test_manifest_with_remote_code_keys_is_refused_before_any_base_loads(where, key, tmp_path, monkeypatch):
    trained_save(tmp_path / "out")

    def change(m):
        (m if where == "top" else m["config"])[key] = True if key == "trust_remote_code" else {"AutoModel": "x.Y"}
    edit_manifest(tmp_path / "out", change)

    def no_base(*args, **kwargs):
        raise AssertionError("a base model was loaded from a manifest that asks for remote code")
    monkeypatch.setattr(adapters.loading, "load_base_model", no_base)

    with pytest.raises(adapters.AdaptersError, match=key) as err:
        adapters.load(tmp_path / "out")
    assert str(tmp_path / "out" / store.MANIFEST) in str(err.value)


@pytest.mark.parametrize("key", ["format_version", "strategy", "config", "base_model", "fingerprint", "shape"])
def test_manifest_missing_required_key(key, tmp_path):
    trained_save(tmp_path / "out")
    edit_manifest(tmp_path / "out", lambda m: m.pop(key))
    with pytest.raises(adapters.AdaptersError, match=rf"missing required key\(s\) .*\b{key}\b") as err:
        adapters.load(tmp_path / "out")
    assert str(tmp_path / "out") in str(err.value)


# ------------------------------------------------------------------- names that are paths (row 24)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "a\0b", ".."])
def test_manifest_files_must_be_plain_names(name, tmp_path):
    trained_save(tmp_path / "out")
    edit_manifest(tmp_path / "out", lambda m: m["files"].append(name))
    with pytest.raises(adapters.AdaptersError, match="not a plain file name"):
        adapters.load(tmp_path / "out")


def test_output_with_a_nul_character_is_refused(tmp_path):
    base = tiny()
    strategy, config, model = apply("linear-probe", base)
    with pytest.raises(adapters.AdaptersError, match="NUL character"):
        adapters.save(model, f"{tmp_path}/a\0b", strategy=strategy, config=config, base=base)


def test_a_checkpoint_that_is_a_symbolic_link_is_never_resumed(tmp_path):
    from adapters import checkpoints

    outside = tmp_path / "elsewhere" / "step-9"
    outside.mkdir(parents=True)
    (outside / checkpoints.STATE).write_text("{}")
    root = tmp_path / "run" / checkpoints.CHECKPOINTS
    root.mkdir(parents=True)
    (root / "step-9").symlink_to(outside, target_is_directory=True)
    assert checkpoints.latest_checkpoint(tmp_path / "run") is None


def test_manifest_newer_format_version(tmp_path):
    trained_save(tmp_path / "out")
    newer = store.FORMAT_VERSION + 1
    edit_manifest(tmp_path / "out", lambda m: m.update(format_version=newer))
    with pytest.raises(adapters.AdaptersError, match=rf"format_version {newer} is newer.*Upgrade adapters"):
        adapters.load(tmp_path / "out")


@pytest.mark.parametrize("version", ["2", None, 1.5, True])
def test_manifest_format_version_of_wrong_type(version, tmp_path):
    trained_save(tmp_path / "out")
    edit_manifest(tmp_path / "out", lambda m: m.update(format_version=version))
    with pytest.raises(adapters.AdaptersError, match="format_version"):
        adapters.load(tmp_path / "out")


@pytest.mark.parametrize("key", ["config", "shape"])
def test_manifest_config_and_shape_must_be_objects(key, tmp_path):
    trained_save(tmp_path / "out")
    edit_manifest(tmp_path / "out", lambda m: m.update({key: []}))
    with pytest.raises(adapters.AdaptersError, match=key) as err:
        adapters.load(tmp_path / "out")
    assert str(tmp_path / "out" / store.MANIFEST) in str(err.value)


def test_manifest_unknown_keys_warn_by_name_and_still_load(tmp_path):
    expected, batch = trained_save(tmp_path / "out")
    edit_manifest(tmp_path / "out", lambda m: m.update(zeta_future=1, alpha_future={"x": 2}))
    with pytest.warns(UserWarning, match="alpha_future, zeta_future"):
        loaded = adapters.load(tmp_path / "out")
    assert torch.equal(logits(loaded.model, batch), expected)


def test_clean_manifest_gives_no_warning(tmp_path):
    trained_save(tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        store.read_manifest(tmp_path / "out")


@pytest.mark.parametrize("config", [{"r": "sixteen"}, {"use_dorra": True}])
def test_manifest_config_errors_name_the_manifest(config, tmp_path):
    trained_save(tmp_path / "out", "lora")
    edit_manifest(tmp_path / "out", lambda m: m["config"].update(config))
    with pytest.raises(adapters.AdaptersError, match=next(iter(config))) as err:
        adapters.load(tmp_path / "out")
    assert store.MANIFEST in str(err.value)


def test_not_a_save_directory(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(adapters.AdaptersError, match="not a directory") as err:
        adapters.load(a_file)
    assert str(a_file) in str(err.value)
    with pytest.raises(adapters.AdaptersError, match="not a directory"):
        adapters.load(tmp_path / "missing")

    (tmp_path / "empty").mkdir()
    with pytest.raises(adapters.AdaptersError, match=rf"no {store.MANIFEST}") as err:
        adapters.load(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)

    # An interrupted save: weights but no manifest.
    trained_save(tmp_path / "out")
    (tmp_path / "out" / store.MANIFEST).unlink()
    with pytest.raises(adapters.AdaptersError, match=rf"no {store.MANIFEST}"):
        adapters.load(tmp_path / "out")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\udcff"])
def test_manifest_that_is_not_a_json_object(text, tmp_path):
    trained_save(tmp_path / "out")
    (tmp_path / "out" / store.MANIFEST).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(adapters.AdaptersError, match=re.escape(str(tmp_path / "out" / store.MANIFEST))):
        adapters.load(tmp_path / "out")


# ---------------------------------------------------------------------------- pickles (row 1) and bytes


@pytest.mark.parametrize("name, weights", [("linear-probe", "weights.safetensors"),
                                           ("lora", "adapter_model.safetensors")])
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_renamed_safetensors_is_refused_by_content(name, weights, how, tmp_path, no_unpickling):
    out = tmp_path / "out"
    sentinel = tmp_path / "SENTINEL"
    trained_save(out, name)
    path = out / weights
    assert path.exists()
    payload = {"weight": Payload(sentinel)}
    with path.open("wb") as f:  # both only pickle; nothing here unpickles
        if how == "pickle":
            pickle.dump(payload, f)
        else:
            torch.save(payload, f)
    # The file really is a weaponised pickle (inspected, never executed).
    data = path.read_bytes()
    if how == "pickle":
        ops = [arg for _, arg, _ in pickletools.genops(data)]
        assert "open" in ops and str(sentinel) in ops

    with pytest.raises(adapters.AdaptersError, match=r"not a safetensors file.*never loads pickles") as err:
        adapters.load(out)
    assert str(path) in str(err.value)
    assert not sentinel.exists()
    assert no_unpickling == []


def test_pickled_adapter_model_bin_only_is_refused(tmp_path, no_unpickling):
    out = tmp_path / "out"
    sentinel = tmp_path / "SENTINEL"
    trained_save(out, "lora")
    (out / "adapter_model.safetensors").unlink()
    (out / "adapter_model.bin").write_bytes(pickle.dumps({"w": Payload(sentinel)}))
    with pytest.raises(adapters.AdaptersError, match=r"adapter_model\.bin.*never unpickles"):
        adapters.load(out)
    assert not sentinel.exists()
    assert no_unpickling == []


@pytest.mark.parametrize("content", ["empty", "short", "truncated", "zero-header", "text"])
def test_read_safetensors_refuses_what_is_not_safetensors(content, tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(12.0).reshape(3, 4)}, good)
    assert torch.equal(adapters.read_safetensors(good)["w"], torch.arange(12.0).reshape(3, 4))
    data = {
        "empty": b"",
        "short": b"\x01\x02\x03",
        "truncated": good.read_bytes()[:40],
        "zero-header": (0).to_bytes(8, "little") + b"{}",
        "text": b'{"w": [1, 2, 3]}',
    }[content]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data)
    with pytest.raises(adapters.AdaptersError, match=re.escape(str(bad))):
        adapters.read_safetensors(bad)


def test_read_safetensors_missing_file(tmp_path):
    with pytest.raises(adapters.AdaptersError, match="file not found"):
        adapters.read_safetensors(tmp_path / "nope.safetensors")


# --------------------------------------------------------------------------- keys and shapes (rows 5, 7)


def rewrite(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("name, weights", [("full-finetune", "weights.safetensors"),
                                           ("lora", "adapter_model.safetensors")])
def test_missing_and_unexpected_keys_are_listed(name, weights, tmp_path):
    out = tmp_path / "out"
    trained_save(out, name)
    path = out / weights
    original = path.read_bytes()
    keys = sorted(load_file(path))
    dropped = keys[len(keys) // 2]

    rewrite(path, lambda t: t.pop(dropped))
    with pytest.raises(adapters.AdaptersError, match=r"missing 1 key\(s\)") as err:
        adapters.load(out)
    assert dropped in str(err.value) and str(path) in str(err.value)

    path.write_bytes(original)
    rewrite(path, lambda t: t.update({"stray.weight": torch.zeros(2), "another.bias": torch.zeros(1)}))
    with pytest.raises(adapters.AdaptersError, match=r"unexpected 2 key\(s\): another\.bias, stray\.weight"):
        adapters.load(out)


def test_weight_of_wrong_shape_names_parameter_and_both_shapes(tmp_path):
    out = tmp_path / "out"
    trained_save(out, "full-finetune")
    path = out / "weights.safetensors"
    name = "model.norm.weight"
    right = tuple(load_file(path)[name].shape)
    wrong = (right[0] + 3,)
    rewrite(path, lambda t: t.update({name: torch.ones(wrong)}))
    with pytest.raises(adapters.AdaptersError) as err:
        adapters.load(out)
    message = str(err.value)
    assert name in message and str(wrong) in message and str(right) in message


def test_peft_weights_loaded_with_other_options_name_parameter_and_shapes(tmp_path):
    out = tmp_path / "out"
    trained_save(out, "lora", r="8")
    edit_manifest(out, lambda m: m["config"].update(r=4))
    with pytest.raises(adapters.AdaptersError) as err:
        adapters.load(out)
    match = re.search(r"parameter (\S+) has shape (\(.*?\)) in the file but (\(.*?\)) in the model", str(err.value))
    assert match, str(err.value)
    saved = load_file(out / "adapter_model.safetensors")
    assert match[2] == str(tuple(saved[match[1]].shape))
    # The model's shape is the file's with the rank 8 replaced by 4.
    assert match[3] == str(tuple(4 if d == 8 else d for d in saved[match[1]].shape)) != match[2]


# ------------------------------------------------------------------------ base identity (rows 5 and 6)


def test_base_with_same_shapes_but_other_weights_is_refused(tmp_path, other_checkpoints):
    trained_save(tmp_path / "out", "lora")
    other = adapters.load_base_model(str(other_checkpoints["same-shape"]))
    assert other.fingerprint != tiny().fingerprint
    with pytest.raises(adapters.AdaptersError, match="other weights") as err:
        adapters.load(tmp_path / "out", base=other)
    message = str(err.value)
    assert other.fingerprint in message and tiny().fingerprint in message and "random:tiny" in message
    # By name, too.
    with pytest.raises(adapters.AdaptersError, match="fingerprint"):
        adapters.load(tmp_path / "out", base=str(other_checkpoints["same-shape"]))


def test_allow_other_base_loads_with_a_warning_and_the_next_save_records_it(tmp_path, other_checkpoints):
    expected, batch = trained_save(tmp_path / "out", "lora")
    other = adapters.load_base_model(str(other_checkpoints["same-shape"]))
    with pytest.raises(adapters.AdaptersError, match="--allow-other-base"):
        adapters.load(tmp_path / "out", base=other)
    with pytest.warns(adapters.OtherBase, match="loaded anyway"):
        loaded = adapters.load(tmp_path / "out", base=other, allow_other_base=True)
    assert loaded.other_base == {"base_model": "random:tiny", "fingerprint": tiny().fingerprint}
    # Saved again onto the other base, the manifest says where the weights were trained first.
    adapters.save(loaded.model, tmp_path / "again", strategy=loaded.strategy, config=loaded.config, base=other,
                  other_base=loaded.other_base)
    manifest = store.read_manifest(tmp_path / "again")
    assert manifest.fingerprint == other.fingerprint and manifest.other_base == loaded.other_base
    with warnings.catch_warnings():
        warnings.simplefilter("error", adapters.OtherBase)  # onto the base it now names: no warning; the record stays
        reloaded = adapters.load(tmp_path / "again", base=str(other_checkpoints["same-shape"]))
    assert reloaded.other_base == loaded.other_base


def test_resume_onto_a_base_with_other_weights_needs_allow_other_base(tmp_path, capsys):
    from adapters.models import random_config

    from cli_helpers import assert_user_error, run_in_process

    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(random_config("tiny")).save_pretrained(base_dir)
    capsys.readouterr()  # transformers' progress bar
    out = tmp_path / "run"
    args = ("train", "--model", str(base_dir), "--strategy", "linear-probe", "--max-steps", "3", "--save-every",
            "1", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1", "--output", str(out))
    code, _, err = run_in_process(capsys, *args, "--allow-other-base")
    assert_user_error(code, "", err, "--allow-other-base", "--resume")
    assert not out.exists()
    spec = adapters.RunSpec(model=str(base_dir), strategy="linear-probe", max_steps=3, save_every=1, seq_len=32,
                            batch_size=2, eval_batches=1, output=str(out))
    stop = adapters.train(spec, progress=False, stop=lambda step: step == 1)
    assert stop.status == "interrupted"
    # The base's files change under the run: one weight, same shapes.
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    model.save_pretrained(base_dir)
    capsys.readouterr()
    code, out_text, err = run_in_process(capsys, "train", "--resume", str(out))
    line = assert_user_error(code, out_text, err, "other weights", "--allow-other-base")
    assert "fingerprint" in line
    with pytest.warns(adapters.OtherBase, match="loaded anyway"):
        code, _, err = run_in_process(capsys, "train", "--resume", str(out), "--allow-other-base")
    assert code == 0, err
    manifest = store.read_manifest(out)
    assert manifest.other_base["fingerprint"] != manifest.fingerprint


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers"])
def test_base_with_other_shapes_is_refused_naming_the_key(key, tmp_path, other_checkpoints):
    trained_save(tmp_path / "out", "lora")
    other = adapters.load_base_model(str(other_checkpoints[key]))
    ours, theirs = getattr(tiny().model.config, key), getattr(other.model.config, key)
    assert ours != theirs
    with pytest.raises(adapters.AdaptersError, match=rf"{key}={ours}.* has {key}={theirs}"):
        adapters.load(tmp_path / "out", base=other)


def test_fingerprint_ignores_quantization_and_dtype(tmp_path):
    plain = tiny()
    nf4 = tiny(quantization="nf4")
    assert any(type(m).__name__ == "Linear4bit" for m in nf4.model.modules())  # really quantized
    bf16 = tiny(dtype=torch.bfloat16)
    assert plain.fingerprint == nf4.fingerprint == bf16.fingerprint

    # So an adapter trained on the plain base loads onto its nf4 form (QLoRA inference).
    trained_save(tmp_path / "out", "lora")
    loaded = adapters.load(tmp_path / "out", base=nf4)
    assert loaded.base is nf4


def test_adapter_for_another_task_is_refused(tmp_path):
    trained_save(tmp_path / "out", "lora")
    seq = tiny(task="sequence-classification", labels=LABELS)
    with pytest.raises(adapters.AdaptersError):
        adapters.load(tmp_path / "out", base=seq)


def test_full_finetune_onto_quantized_base_is_a_clear_error(tmp_path):
    trained_save(tmp_path / "out", "full-finetune")
    with pytest.raises(adapters.AdaptersError, match="nf4"):
        adapters.load(tmp_path / "out", base=tiny(quantization="nf4"))


# ----------------------------------------------------------------------- output dir, atomicity (row 18)


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(tmp_path):
    out = tmp_path / "out"
    first, batch = trained_save(out, "linear-probe", seed=1)
    before = digest(out)

    with pytest.raises(adapters.AdaptersError, match=r"not empty.*--overwrite") as err:
        trained_save(out, "linear-probe", seed=2)
    assert str(out) in str(err.value)
    assert digest(out) == before
    assert dot_entries(tmp_path) == []

    base = tiny()
    strategy, config, model = apply("full-finetune", base)
    perturb(model, 2)
    second = logits(model, batch)
    adapters.save(model, out, strategy=strategy, config=config, base=base, overwrite=True)
    assert dot_entries(tmp_path) == []
    assert {p.name for p in out.iterdir()} == DEFAULT_FILES | {store.MANIFEST}
    loaded = adapters.load(out)
    assert loaded.strategy.name == "full-finetune"
    assert torch.equal(logits(loaded.model, batch), second)
    assert not torch.equal(second, first)


def test_output_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("keep me")
    with pytest.raises(adapters.AdaptersError, match="not a directory"):
        trained_save(target)
    with pytest.raises(adapters.AdaptersError, match="not a directory"):
        trained_save(target, overwrite=True)
    assert target.read_text() == "keep me"


def test_empty_existing_dir_and_missing_parents_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    trained_save(tmp_path / "empty")
    assert (tmp_path / "empty" / store.MANIFEST).exists()
    trained_save(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c" / store.MANIFEST).exists()
    assert dot_entries(tmp_path) == [] and dot_entries(tmp_path / "a" / "b") == []


class CrashingProbe:
    """The linear probe, except that saving dies after writing part of a file."""

    def __init__(self) -> None:
        self.inner = adapters.get_strategy("linear-probe")
        self.name = self.inner.name
        self.config_class = self.inner.config_class

    def apply(self, model, config):
        return self.inner.apply(model, config)

    def load(self, model, directory, config):  # a strategy with its own format both saves and loads it
        raise AssertionError("never loaded")

    def save(self, model, directory, config):
        (Path(directory) / "weights.safetensors").write_bytes(b"\x00partial")
        raise OSError("disk full")


def test_crash_inside_strategy_save_leaves_nothing(tmp_path):
    base = tiny()
    strategy = CrashingProbe()
    config = strategy.config_class()
    model = strategy.apply(base.model, config)
    with pytest.raises(OSError, match="disk full"):
        adapters.save(model, tmp_path / "out", strategy=strategy, config=config, base=base)
    assert not (tmp_path / "out").exists()
    assert dot_entries(tmp_path) == []


def test_crash_inside_strategy_save_keeps_the_previous_save(tmp_path):
    out = tmp_path / "out"
    expected, batch = trained_save(out, "linear-probe")
    before = digest(out)

    base = tiny()
    strategy = CrashingProbe()
    config = strategy.config_class()
    model = strategy.apply(base.model, config)
    with pytest.raises(OSError, match="disk full"):
        adapters.save(model, out, strategy=strategy, config=config, base=base, overwrite=True)
    assert digest(out) == before
    assert dot_entries(tmp_path) == []
    assert torch.equal(logits(adapters.load(out).model, batch), expected)


def test_crash_writing_the_manifest_keeps_the_previous_save(tmp_path):
    """A config that cannot be written as strict JSON fails the save at the manifest, the last file."""
    out = tmp_path / "out"
    expected, batch = trained_save(out, "lora")
    before = digest(out)
    base = tiny()
    strategy, config, model = apply("lora", base)
    config.dropout = float("nan")
    with pytest.raises(ValueError):
        adapters.save(model, out, strategy=strategy, config=config, base=base, overwrite=True)
    assert digest(out) == before
    assert dot_entries(tmp_path) == []
    assert torch.equal(logits(adapters.load(out).model, batch), expected)


def test_failed_final_rename_keeps_the_previous_save_in_place(tmp_path, monkeypatch):
    import os

    out = tmp_path / "out"
    expected, batch = trained_save(out, "linear-probe")
    before = digest(out)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).is_dir() and ".tmp-" in Path(src).name:
            raise OSError("simulated crash while renaming the new save into place")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    base = tiny()
    strategy, config, model = apply("linear-probe", base)
    with pytest.raises(OSError, match="simulated crash"):
        adapters.save(model, out, strategy=strategy, config=config, base=base, overwrite=True)
    monkeypatch.undo()
    assert out.is_dir() and digest(out) == before
    assert torch.equal(logits(adapters.load(out).model, batch), expected)
