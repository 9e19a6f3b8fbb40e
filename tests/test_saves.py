"""Saves that lose nothing (issue 14): --overwrite replaces only adapters' own directory, a kill between
the two renames of a save is recovered, non-finite weights are neither written nor read, weights the
base checkpoint lacks are saved, PEFT's files carry the base's name and not a local path, and saves
from 0.1.0 still load.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_plugin_kit import Norms
from test_store import (
    LABELS,
    apply,
    digest,
    dot_entries,
    edit_manifest,
    inputs,
    logits,
    perturb,
    rewrite,
    tiny,
    trained_save,
)

import adapters
from adapters import store
from adapters.testing import plugin_for

from cli_helpers import assert_user_error, run_in_process

QUICK = ["--model", "random:tiny", "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1"]
V010 = Path(__file__).parent / "data" / "saves-0.1.0"


def listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run_output(directory: Path) -> None:
    """What an interrupted `adapters train --save-every` leaves: a checkpoint, metrics and tracker logs."""
    (directory / "checkpoints" / "step-2" / "model").mkdir(parents=True)
    (directory / "checkpoints" / "step-2" / "state.json").write_text("{}")
    (directory / "metrics.jsonl").write_text('{"step": 1}\n')
    (directory / "logs" / "tb").mkdir(parents=True)


# ------------------------------------------------------------------- item 1: --overwrite and user files


def test_overwrite_refuses_a_folder_holding_user_files(tmp_path, capsys):
    """The issue's reproduction: it exited 0 and thesis.txt was gone."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "thesis.txt").write_text("x")
    code, out, err = run_in_process(capsys, "train", *QUICK, "--strategy", "linear-probe", "--output", str(d),
                                    "--overwrite")
    assert_user_error(code, out, err, f"--output {d}", "thesis.txt", "Choose another --output")
    assert listing(d) == {"thesis.txt": b"x"}
    assert dot_entries(tmp_path) == []


@pytest.mark.parametrize("make_cwd", ["project", "empty"])
def test_output_dot_is_refused_before_training(make_cwd, tmp_path, capsys, monkeypatch):
    """`--output .` gave an OSError traceback after training; now a one-line refusal before it."""
    if make_cwd == "project":
        (tmp_path / "notes.md").write_text("mine")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_in_process(capsys, "train", *QUICK, "--strategy", "linear-probe", "--output", ".",
                                    "--overwrite")
    assert_user_error(code, out, err, "--output .", "current directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["notes.md"] if make_cwd == "project" else [])


def test_overwrite_replaces_a_previous_save_through_the_cli(tmp_path, capsys):
    out = tmp_path / "out"
    trained_save(out, "linear-probe")
    assert store.foreign_entries(out) == []
    code, stdout, err = run_in_process(capsys, "train", *QUICK, "--strategy", "lora", "--output", str(out),
                                       "--overwrite")
    assert code == 0, err
    assert adapters.load(out).strategy.name == "lora"
    assert not (out / "weights.safetensors").exists()  # the old save's own file went with it
    assert store.foreign_entries(out) == [] and dot_entries(tmp_path) == []


def test_api_save_with_overwrite_refuses_user_files_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    trained_save(out, "linear-probe")
    (out / "notes.txt").write_text("mine")
    before = listing(out)
    with pytest.raises(adapters.AdaptersError, match=r"holds notes\.txt, which no adapters save or run wrote") as err:
        trained_save(out, "lora", overwrite=True)
    assert str(out) in str(err.value)
    assert listing(out) == before and dot_entries(tmp_path) == []


def test_overwrite_accepts_an_interrupted_run_and_a_save_with_its_run_files(tmp_path):
    run = tmp_path / "run"
    run_output(run)
    assert store.foreign_entries(run) == []
    assert store.check_output_dir(run, overwrite=True) == run

    saved = tmp_path / "saved"
    trained_save(saved, "lora")
    run_output(saved)
    assert store.foreign_entries(saved) == []
    (saved / "checkpoints" / ".step-3.tmp-0badc0de").mkdir()  # checkpoints a kill cut short
    (saved / "checkpoints" / ".step-4.tmp-4242-0badc0de").mkdir()
    assert store.foreign_entries(saved) == []


@pytest.mark.parametrize("make, foreign", [
    (lambda d: None, []),
    (lambda d: d.mkdir(), []),
    (lambda d: d.write_text("x"), ["d"]),
    (lambda d: (d.mkdir(), (d / "a.txt").write_text("x"), (d / "b").mkdir()), ["a.txt", "b"]),
    # A run's entries hold only what a run writes: a stray file in checkpoints/ is not adapters' own.
    (lambda d: (run_output(d), (d / "checkpoints" / "notes.txt").write_text("x")), ["checkpoints/notes.txt"]),
    (lambda d: (run_output(d), (d / "checkpoints" / "step-9").write_text("x")), ["checkpoints/step-9"]),
    # Weights without a manifest are not recognised as a save.
    (lambda d: (d.mkdir(), (d / "weights.safetensors").write_bytes(b"x")), ["weights.safetensors"]),
    (lambda d: (d.mkdir(), (d / "adapters.json").write_text("{broken"), (d / "weights.safetensors").write_bytes(b"x")),
     ["weights.safetensors"]),
])
def test_foreign_entries(make, foreign, tmp_path):
    make(tmp_path / "d")
    assert store.foreign_entries(tmp_path / "d") == foreign


def test_output_that_is_a_symbolic_link_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(adapters.AdaptersError, match="symbolic link"):
        trained_save(tmp_path / "link")
    assert list((tmp_path / "real").iterdir()) == [] and (tmp_path / "link").is_symlink()


def test_foreign_entries_of_a_save_are_what_its_manifest_does_not_list(tmp_path):
    out = tmp_path / "out"
    trained_save(out, "lora")
    (out / "extra.bin").write_bytes(b"x")
    os.symlink(tmp_path, out / "logs")  # a run entry's name, but a link to elsewhere
    assert store.foreign_entries(out) == ["extra.bin", "logs"]


# ------------------------------------------------------------------------ item 6: the crash window


def killed_save(out: Path, at: str, keep: tuple[str, ...] = ()) -> torch.Tensor:
    """Save a new model over ``out`` in a forked child that SIGKILLs itself at ``at``; the new model's logits."""
    base = tiny()
    strategy, config, model = apply("linear-probe", base)
    perturb(model, 2)
    new = logits(model, inputs(base))
    pid = os.fork()
    if pid == 0:  # the child: a real process, killed for real
        try:
            def kill_if(condition):
                def call(real):
                    def wrapped(*args, **kwargs):
                        if condition(*args):
                            os.kill(os.getpid(), signal.SIGKILL)
                        return real(*args, **kwargs)
                    return wrapped
                return call

            if at == "writing":  # in the middle of the strategy's files
                store.save_trainable = kill_if(lambda *a: True)(store.save_trainable)
            elif at == "between":  # the old save set aside, the new one not yet renamed in
                os.replace = kill_if(lambda src, dst: Path(src).name.startswith(f".{out.name}.tmp-"))(os.replace)
            else:  # "after": the new save in place, the old one not yet removed
                import shutil
                shutil.rmtree = kill_if(lambda path, *a: f".{out.name}.old-" in str(path))(shutil.rmtree)
            adapters.save(model, out, strategy=strategy, config=config, base=base, overwrite=True, keep=keep)
        finally:
            os._exit(3)  # never reached when the kill happened
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    return new


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_between_the_two_renames_then_load_restores_the_previous_save(tmp_path):
    out = tmp_path / "out"
    expected, batch = trained_save(out, "linear-probe", seed=1)
    killed_save(out, "between")
    assert not out.exists()  # the window the issue describes: the previous save only as a hidden copy
    assert [n.split("-")[0] for n in dot_entries(tmp_path)] == [".out.old", ".out.tmp"]

    loaded = adapters.load(out)
    assert torch.equal(logits(loaded.model, batch), expected)
    assert dot_entries(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_between_the_two_renames_then_the_next_save_restores_first(tmp_path):
    out = tmp_path / "out"
    expected, batch = trained_save(out, "linear-probe", seed=1)
    killed_save(out, "between")
    with pytest.raises(adapters.AdaptersError, match="not empty"):  # the previous save is back, and kept
        trained_save(out, "linear-probe", seed=3)
    assert torch.equal(logits(adapters.load(out).model, batch), expected)
    assert dot_entries(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_after_the_renames_keeps_the_new_save_and_the_run_files(tmp_path):
    out = tmp_path / "out"
    trained_save(out, "linear-probe", seed=1)
    run_output(out)
    new = killed_save(out, "after", keep=store.RUN_ENTRIES)
    assert (out / store.MANIFEST).exists() and [n.split("-")[0] for n in dot_entries(tmp_path)] == [".out.old"]

    loaded = adapters.load(out)
    assert torch.equal(logits(loaded.model, inputs(loaded.base)), new)
    assert (out / "checkpoints" / "step-2" / "state.json").exists() and (out / "metrics.jsonl").exists()
    assert dot_entries(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_while_writing_leaves_the_previous_save_and_the_temp_dir_goes(tmp_path):
    out = tmp_path / "out"
    expected, batch = trained_save(out, "linear-probe", seed=1)
    before = digest(out)
    killed_save(out, "writing")
    assert digest(out) == before and [n.split("-")[0] for n in dot_entries(tmp_path)] == [".out.tmp"]
    assert torch.equal(logits(adapters.load(out).model, batch), expected)
    assert dot_entries(tmp_path) == []


def test_leftovers_of_a_running_save_are_left_alone(tmp_path):
    """A load must not break a save that another process has in progress beside it."""
    out = tmp_path / "out"
    expected, batch = trained_save(out)
    sleeper = subprocess.Popen(["sleep", "30"])
    ended = subprocess.Popen(["true"])
    ended.wait()  # its pid now names a leftover whose writer is gone
    try:
        running = [tmp_path / f".out.tmp-{sleeper.pid}-0badc0de", tmp_path / f".out.old-{sleeper.pid}-0badc0de"]
        (tmp_path / f".out.tmp-{ended.pid}-0ddba11a").mkdir()
        for path in running:
            path.mkdir()
        assert torch.equal(logits(adapters.load(out).model, batch), expected)
        assert dot_entries(tmp_path) == sorted(p.name for p in running)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fsynced paths from /proc")
def test_files_and_directories_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    out = tmp_path / "out"
    trained_save(out, "linear-probe")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    trained_save(out, "linear-probe", seed=2, overwrite=True)
    monkeypatch.undo()

    moved_in = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out))
    tmp = events[moved_in][1]
    synced = {e[1] for e in events[:moved_in] if e[0] == "fsync"}
    assert {f"{tmp}/{p.name}" for p in out.iterdir()} | {tmp} <= synced
    assert ("fsync", str(tmp_path)) in events[moved_in:]  # the rename itself made durable


# ------------------------------------------------------------------------- item 4: non-finite weights


@pytest.mark.parametrize("name, value", [("linear-probe", float("nan")), ("lora", float("inf"))])
def test_save_refuses_non_finite_weights_and_keeps_the_previous_save(name, value, tmp_path):
    out = tmp_path / "out"
    expected, batch = trained_save(out, name)
    before = digest(out)
    base = tiny()
    strategy, config, model = apply(name, base)
    poisoned, param = list(adapters.trainable_parameters(model))[-1]
    with torch.no_grad():
        param.view(-1)[0] = value
    with pytest.raises(adapters.AdaptersError, match="NaN or infinite") as err:
        adapters.save(model, out, strategy=strategy, config=config, base=base, overwrite=True)
    message = str(err.value)
    assert poisoned in message and str(out) in message and "previous save is kept" in message
    assert digest(out) == before and dot_entries(tmp_path) == []
    assert torch.equal(logits(adapters.load(out).model, batch), expected)


@pytest.mark.parametrize("name, weights", [("linear-probe", "weights.safetensors"),
                                           ("full-finetune", "weights.safetensors"),
                                           ("lora", "adapter_model.safetensors")])
def test_load_refuses_weights_that_are_not_finite(name, weights, tmp_path):
    out = tmp_path / "out"
    trained_save(out, name)
    path = out / weights
    tensor = sorted(load_file(path))[0]

    def poison(tensors):
        tensors[tensor] = tensors[tensor].clone()
        tensors[tensor].view(-1)[-1] = float("nan")
    rewrite(path, poison)
    with pytest.raises(adapters.AdaptersError, match="NaN or infinite") as err:
        adapters.load(out)
    assert str(path) in str(err.value) and tensor in str(err.value)
    assert len(str(err.value).splitlines()) == 1


# ----------------------------------------------------------------------- newly initialised weights


class NormOnly(Norms):
    """The kit's norm-only strategy, for sequence classification too: the new head stays as initialised."""

    name = "test-norm-only"
    supported_tasks = frozenset({"causal-lm", "sequence-classification"})


def classifier(seed: int) -> adapters.BaseModel:
    torch.manual_seed(seed)  # the new head is initialised from the global generator
    return tiny(task="sequence-classification", labels=LABELS)


@pytest.mark.parametrize("name", ["test-norm-only", "lora"])
def test_weights_the_base_checkpoint_lacks_are_saved_and_restored(name, tmp_path, register_plugin):
    register_plugin(plugin_for(NormOnly()), name="test-norm-only")
    base = classifier(seed=1)
    assert base.new_weights == ["score.weight"]
    strategy, config, model = apply(name, base)
    perturb(model, 4)
    batch = inputs(base)
    expected = logits(model, batch)
    adapters.save(model, tmp_path / "out", strategy=strategy, config=config, base=base)
    manifest = json.loads((tmp_path / "out" / store.MANIFEST).read_text())
    assert store.NEW_WEIGHTS in manifest["files"]
    assert list(load_file(tmp_path / "out" / store.NEW_WEIGHTS)) == ["score.weight"]

    other = classifier(seed=2)  # another random head: what a reload without the saved one gets
    head = other.model.score.weight.detach().clone()
    loaded = adapters.load(tmp_path / "out", base=other)
    assert not torch.equal(loaded.model.get_base_model().score.weight if name == "lora" else loaded.model.score.weight,
                           head)
    assert torch.equal(logits(loaded.model, batch), expected)


# ------------------------------------------------------------------------------------------------ paths


def test_peft_files_name_a_local_base_by_its_folder_not_its_path(tmp_path):
    from peft import PeftModel

    folder = tmp_path / "bases" / "my-base"
    tiny().model.save_pretrained(folder)
    base = adapters.load_base_model(str(folder))
    strategy, config, model = apply("lora", base)
    perturb(model, 5)
    batch = inputs(base)
    expected = logits(model, batch)
    out = tmp_path / "out"
    adapters.save(model, out, strategy=strategy, config=config, base=base)

    for public in ("README.md", "adapter_config.json"):
        assert str(tmp_path) not in (out / public).read_text(), public
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-base"
    assert "base_model: my-base" in (out / "README.md").read_text()
    manifest = json.loads((out / store.MANIFEST).read_text())
    assert manifest["base_model"] == "my-base" and manifest["local"] == {"base_path": str(folder.resolve())}

    assert torch.equal(logits(adapters.load(out).model, batch), expected)  # found through the local path
    plain = PeftModel.from_pretrained(adapters.load_base_model(str(folder)).model, out)
    assert torch.equal(logits(plain, batch), expected)


def test_peft_files_name_a_named_model_by_its_name(tmp_path):
    out = tmp_path / "out"
    trained_save(out, "lora")
    cache = str(adapters.models.MODELS["random:tiny"].locate())
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "random:tiny"
    assert cache not in (out / "README.md").read_text() and "random:tiny" in (out / "README.md").read_text()
    assert json.loads((out / store.MANIFEST).read_text())["local"] is None


# ---------------------------------------------------------------------- item 11 and older manifests


@pytest.mark.parametrize("key, value", [("base_model", None), ("strategy", 5), ("labels", 5), ("task", []),
                                        ("files", "weights.safetensors"), ("local", "/somewhere")])
def test_manifest_value_of_the_wrong_type_is_one_line_naming_the_key(key, value, tmp_path):
    trained_save(tmp_path / "out")
    edit_manifest(tmp_path / "out", lambda m: m.update({key: value}))
    with pytest.raises(adapters.AdaptersError) as err:
        adapters.load(tmp_path / "out")
    message = str(err.value)
    assert f"$.{key}" in message and str(tmp_path / "out" / store.MANIFEST) in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("name", ["lora", "linear-probe"])
def test_saves_written_by_0_1_0_still_load(name):
    manifest = json.loads((V010 / name / store.MANIFEST).read_text())
    assert "local" not in manifest and "adapters" not in manifest["versions"]  # really the old writer's
    ids = torch.arange(24).reshape(2, 12) * 7 % 200 + 3
    with pytest.warns(UserWarning, match="saved by adapters 0.1, whose fingerprint checks only"):
        loaded = adapters.load(V010 / name)
    assert loaded.strategy.name == name and loaded.manifest.base_model == "random:tiny"
    got = logits(loaded.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, -4:]
    torch.testing.assert_close(got.float(), load_file(V010 / "logits.safetensors")[name], rtol=0, atol=1e-5)
    assert sorted(p.name for p in V010.iterdir() if p.name.startswith(".")) == []


def test_a_0_1_0_save_onto_a_base_with_other_weights_is_still_refused(tmp_path):
    """Its weak fingerprint still tells a base whose embeddings differ."""
    folder = tmp_path / "other"
    other = tiny()
    emb = other.model.get_input_embeddings().weight
    with torch.no_grad():
        emb.add_(0.01 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(7)))
    other.model.save_pretrained(folder)
    with pytest.raises(adapters.AdaptersError, match="other weights") as err:
        adapters.load(V010 / "lora", base=str(folder))
    assert "0d442f45c81487ec" in str(err.value)
