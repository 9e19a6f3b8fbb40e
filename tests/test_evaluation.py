"""Using a run: `adapters eval` (of a run or a merged checkpoint), `adapters train --resume` of a run
with a final save and no checkpoint, and `adapters bench --run`.

Every run is real (random:tiny, CPU, fp32) and scored by the same code as training, so the numbers
must agree exactly with what `adapters train` reported.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import adapters
from adapters.errors import TokenizerFallback
from adapters.evaluation import evaluate_run
from adapters.options import build_config

from cli_helpers import assert_user_error, run_in_process

TINY_ARGS = ["--model", "random:tiny", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "2"]


def train(capsys, out: Path, *args: str) -> dict:
    code, stdout, err = run_in_process(capsys, "train", *TINY_ARGS, "--max-steps", "3", "--learning-rate", "1e-2",
                                       "--output", str(out), "--json", *args)
    assert code == 0, err
    return json.loads(stdout)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> tuple[Path, dict]:
    """A LoRA trained 3 steps on random:tiny (no checkpoints), and its train summary."""
    out = tmp_path_factory.mktemp("lm") / "run"
    result = adapters.train(adapters.RunSpec(model="random:tiny", batch_size=2, seq_len=32, eval_batches=2,
                                             max_steps=3, learning_rate=1e-2, output=str(out)), progress=False)
    assert result.status == "completed"
    return out, result.summary()


def eval_json(capsys, *args: str) -> dict:
    code, out, err = run_in_process(capsys, "eval", *args, "--json")
    assert code == 0, err
    return json.loads(out)


# ------------------------------------------------------------------------------------------- eval


def test_eval_of_a_run_equals_the_after_of_its_train_summary(lm_run, capsys):
    out, summary = lm_run
    result = eval_json(capsys, str(out))
    assert result["loss"] == pytest.approx(summary["heldout_after"]["loss"], abs=1e-6, rel=0)
    assert result["perplexity"] == pytest.approx(summary["heldout_after"]["perplexity"], rel=1e-6)
    assert result["loss"] != pytest.approx(summary["heldout_before"]["loss"], abs=1e-4)  # the training shows
    assert (result["kind"], result["strategy"], result["model"], result["task"]) == ("run", "lora", "random:tiny",
                                                                                    "causal-lm")
    assert (result["data"], result["split"], result["batches"], result["batch_size"], result["seq_len"]) == (
        "python-reference", "held-out", 2, 2, 32)


def test_eval_prints_a_table(lm_run, capsys):
    out, summary = lm_run
    code, stdout, err = run_in_process(capsys, "eval", str(out))
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0] == f"{out} (run, causal-lm: lora on random:tiny)"
    assert lines[2].split() == ["loss", "perplexity"]
    assert lines[4].split()[0] == f"{summary['heldout_after']['loss']:.4f}"


def test_a_merged_checkpoint_scores_as_its_run(lm_run, tmp_path, capsys):
    """PEFT's merge_and_unload, saved with save_pretrained: a plain transformers folder, scored as a base."""
    out, _ = lm_run
    run = eval_json(capsys, str(out))
    adapters.load(out).model.merge_and_unload().save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenizerFallback)  # random:tiny has no tokenizer files to save
        merged = evaluate_run(tmp_path / "merged", batches=2, batch_size=2, seq_len=32)
    assert (merged["kind"], merged["strategy"], merged["task"]) == ("checkpoint", None, "causal-lm")
    assert merged["loss"] == pytest.approx(run["loss"], abs=1e-5, rel=0)


def test_a_merged_checkpoint_takes_the_settings_its_merge_record_holds(lm_run, tmp_path, capsys):
    """The record `adapters merge` writes beside the checkpoint names the base and, where it holds them,
    the run's training settings: the checkpoint is then scored as its run, with no flag."""
    out, _ = lm_run
    run = eval_json(capsys, str(out))
    adapters.load(out).model.merge_and_unload().save_pretrained(tmp_path / "merged")
    manifest = json.loads((out / "adapters.json").read_text())
    (tmp_path / "merged" / "adapters.json").write_text(json.dumps({"kind": "merged-checkpoint", "merged_from": {
        "run": str(out), "base_model": manifest["base_model"], "quantization": "none",
        "training": manifest["training"]}}))
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenizerFallback)
        merged = eval_json(capsys, str(tmp_path / "merged"))
        code, stdout, err = run_in_process(capsys, "eval", str(tmp_path / "merged"))
    assert (merged["batches"], merged["batch_size"], merged["seq_len"]) == (2, 2, 32)
    assert merged["model"] == "random:tiny" and merged["loss"] == pytest.approx(run["loss"], abs=1e-5, rel=0)
    assert stdout.splitlines()[0] == f"{tmp_path / 'merged'} (checkpoint, causal-lm, merged into random:tiny)"


def test_classification_accuracy_of_a_run_and_of_its_merged_checkpoint(tmp_path, capsys):
    summary = train(capsys, tmp_path / "run", "--task", "sequence-classification", "--max-steps", "2")
    result = eval_json(capsys, str(tmp_path / "run"))
    assert set(result) >= {"loss", "accuracy"} and "perplexity" not in result
    assert result["loss"] == pytest.approx(summary["heldout_after"]["loss"], abs=1e-6, rel=0)
    assert result["accuracy"] == summary["heldout_after"]["accuracy"]
    assert 0 <= result["accuracy"] <= 1
    loaded = adapters.load(tmp_path / "run")
    loaded.model.merge_and_unload().save_pretrained(tmp_path / "merged")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenizerFallback)
        merged = eval_json(capsys, str(tmp_path / "merged"), "--batches", "2", "--batch-size", "2",
                           "--seq-len", "32")
    assert merged["task"] == "sequence-classification"
    assert merged["loss"] == pytest.approx(result["loss"], abs=1e-5, rel=0)
    assert merged["accuracy"] == result["accuracy"]


def test_instruction_data_is_scored_as_training_scored_it(tmp_path, capsys):
    """The run's own data (prompt/completion, the loss on the completions alone) when --data is not given."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?",
                                        "completion": f" It is {2 * i}."}) + "\n" for i in range(40)))
    summary = train(capsys, tmp_path / "run", "--data", str(data), "--seq-len", "64", "--max-steps", "2")
    result = eval_json(capsys, str(tmp_path / "run"))
    assert result["data"] == str(data) and result["seq_len"] == 64
    assert result["loss"] == pytest.approx(summary["heldout_after"]["loss"], abs=1e-6, rel=0)


def test_data_file_and_split(lm_run, tmp_path, capsys):
    out, _ = lm_run
    data = tmp_path / "notes.txt"
    data.write_text("\n\n".join(f"Note {i}: the {i}th paragraph of text about lists, dicts and sets in Python."
                                for i in range(40)))
    held = eval_json(capsys, str(out), "--data", str(data), "--batches", "100")
    every = eval_json(capsys, str(out), "--data", str(data), "--split", "all", "--batches", "100")
    assert held["data"] == every["data"] == str(data)
    assert 0 < held["examples"] < every["examples"] == 40
    assert held["loss"] != every["loss"]
    builtin = eval_json(capsys, str(out))
    assert held["loss"] != builtin["loss"]


def test_batches_0_measures_nothing_and_says_so(lm_run, capsys):
    out, _ = lm_run
    result = eval_json(capsys, str(out), "--batches", "0")
    assert result["loss"] is None and result["perplexity"] is None
    code, stdout, err = run_in_process(capsys, "eval", str(out), "--batches", "0")
    assert code == 0 and stdout.splitlines()[-1].split() == ["–", "–"]


@pytest.mark.parametrize(("args", "needles"), [
    (["--batches", "-1"], ["--batches must be at least 0"]),
    (["--seq-len", "0"], ["--seq-len must be at least 1"]),
    (["--data", "missing.txt"], ["missing.txt", "not found"]),
], ids=["batches", "seq-len", "data"])
def test_bad_eval_flags_are_one_line_errors_before_loading(args, needles, lm_run, capsys, monkeypatch):
    monkeypatch.setattr("adapters.evaluation.open_run", _no_loading)
    code, out, err = run_in_process(capsys, "eval", str(lm_run[0]), *args)
    assert_user_error(code, out, err, *needles)


def _no_loading(*args, **kwargs):
    raise AssertionError("weights were loaded before the error")


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_eval_of_no_run_is_one_line(what, tmp_path, capsys):
    path = tmp_path / "nothing"
    if what == "empty":
        path.mkdir()
    code, out, err = run_in_process(capsys, "eval", str(path))
    assert_user_error(code, out, err, str(path))


# ------------------------------------------------------------ train --resume of a run without checkpoints


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapters.trainable_parameters(model)}


def test_resume_of_a_final_save_continues_from_its_weights_with_a_fresh_optimizer(tmp_path, capsys):
    out = tmp_path / "run"
    first = train(capsys, out)
    saved = trainable(adapters.load(out).model)
    code, stdout, err = run_in_process(capsys, "train", "--resume", str(out), "--max-steps", "2", "--json")
    assert code == 0, err
    said = [line for line in err.splitlines() if line.startswith("Continuing")]
    assert said == [f"Continuing {out} from its final save (no checkpoint; 3 steps before): a fresh optimizer and "
                    "learning-rate schedule for 2 more steps."]
    summary = json.loads(stdout)
    assert summary["status"] == "completed" and summary["steps"] == 2  # --max-steps counts the steps added
    # It starts where the save ended: its "before" is the first run's "after".
    assert summary["heldout_before"]["loss"] == pytest.approx(first["heldout_after"]["loss"], abs=1e-6, rel=0)
    assert summary["heldout_after"]["loss"] != pytest.approx(first["heldout_after"]["loss"], abs=1e-5)
    training = json.loads((out / "adapters.json").read_text())["training"]
    assert training["started_from"] == {"run": str(out), "from": "final save", "steps_before": 3, "optimizer": "fresh"}
    assert training["max_steps"] == 2
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [3, 0, 2] and events[1]["event"] == "continued"
    now = trainable(adapters.load(out).model)
    assert set(now) == set(saved) and any(not torch.equal(now[n], saved[n]) for n in now)
    # Continued again, it counts every step so far.
    code, stdout, err = run_in_process(capsys, "train", "--resume", str(out), "--max-steps", "1")
    assert code == 0, err
    assert "(no checkpoint; 5 steps before)" in err


def test_a_save_made_elsewhere_continues_with_the_given_settings(tmp_path, capsys):
    """A save with no training record (as `adapters import` or `adapters.save` makes): its strategy,
    options, base and task come from the manifest; the rest from the flags or RunSpec's defaults."""
    base = adapters.load_base_model("random:tiny")
    strategy = adapters.get_strategy("lora")
    config = build_config(strategy.config_class, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "lora")
    out = tmp_path / "made-elsewhere"
    adapters.save(strategy.apply(base.model, config), out, strategy=strategy, config=config, base=base)
    code, stdout, err = run_in_process(capsys, "train", "--resume", str(out), "--max-steps", "2", "--batch-size", "2",
                                       "--seq-len", "32", "--eval-batches", "1", "--json")
    assert code == 0, err
    assert "(no checkpoint; an unknown number of steps before)" in err
    assert json.loads(stdout)["trainable_parameters"] == sum(p.numel() for _, p in
                                                            adapters.trainable_parameters(adapters.load(out).model))
    manifest = json.loads((out / "adapters.json").read_text())
    assert manifest["config"]["r"] == 4 and manifest["config"]["target_modules"] == ["q_proj", "v_proj"]
    assert manifest["training"]["started_from"]["steps_before"] is None


@pytest.mark.parametrize(("args", "needles"), [
    (["--set", "r=8"], ["--set r=8", "contradicts the run being continued", "r=16"]),
    (["--strategy", "full-finetune"], ["--strategy full-finetune", "which has lora"]),
    (["--quantization", "nf4"], ["--quantization nf4", "which has none"]),
], ids=["set-r", "strategy", "quantization"])
def test_continuing_with_other_weights_is_refused_before_loading(args, needles, lm_run, capsys, monkeypatch):
    monkeypatch.setattr("adapters.training.model.load_base_model", _no_loading)
    code, out, err = run_in_process(capsys, "train", "--resume", str(lm_run[0]), *args)
    assert_user_error(code, out, err, *needles)


def test_a_continued_run_stopped_at_a_checkpoint_resumes_exactly_and_keeps_its_origin(tmp_path, capsys):
    from adapters.resuming import resume_spec

    out = tmp_path / "run"
    train(capsys, out)
    spec = resume_spec(out, {"max_steps": 4, "save_every": 2}, {})
    stopped = adapters.train(spec, progress=False, stop=lambda step: step == 2)
    assert stopped.status == "interrupted" and stopped.checkpoints == [out / "checkpoints" / "step-2"]
    resumed = adapters.train(resume_spec(out, {}, {}), progress=False)  # exact resume, from the checkpoint
    assert resumed.status == "completed" and resumed.steps == 4
    training = json.loads((out / "adapters.json").read_text())["training"]
    assert training["started_from"]["steps_before"] == 3


# ----------------------------------------------------------------------------------------- bench --run


def test_bench_run_measures_the_runs_strategy_with_its_options(tmp_path, capsys, monkeypatch):
    import adapters.bench.runner as runner
    from adapters.bench.measure import measure
    from adapters.bench.worker import finite

    cases = []

    def measure_here(spec, measurement):
        cases.append(spec)
        return finite(measure(spec, measurement))

    monkeypatch.setattr(runner, "run_case", measure_here)
    out = tmp_path / "run"
    summary = train(capsys, out, "--set", "r=4", "--set", "target_modules=q_proj,v_proj", "--max-steps", "1")
    report_path = tmp_path / "bench.json"
    code, stdout, err = run_in_process(capsys, "bench", "--run", str(out), "--steps", "1", "--warmup", "0",
                                       "--output", str(report_path))
    assert code == 0, err
    (spec,) = cases
    assert (spec.model, spec.strategy, spec.task, spec.batch_size, spec.seq_len) == (
        "random:tiny", "lora@none", "causal-lm", 2, 32)
    assert spec.options["r"] == 4 and spec.options["target_modules"] == "q_proj,v_proj"
    report = json.loads(report_path.read_text())
    assert report["settings"]["run"] == str(out) and report["settings"]["options"]["r"] == 4
    (result,) = report["results"]
    assert result["status"] == "ok"
    assert result["trainable_parameters"] == summary["trainable_parameters"]
    # The plan's prediction is of the same options: r=4 on two modules, not the default r=16 on all.
    assert result["prediction"]["status"] == "ok"
    assert result["prediction"]["components"]["trainable_parameters"] == 4 * summary["trainable_parameters"]


@pytest.mark.parametrize(("args", "needles"), [
    (["--strategies", "lora"], ["--run takes the model, strategy and task", "drop --strategies"]),
    (["--suite", "s.toml"], ["--run or --suite"]),
], ids=["strategies", "suite"])
def test_bench_run_with_flags_it_sets_itself_is_an_error(args, needles, lm_run, capsys):
    code, out, err = run_in_process(capsys, "bench", "--run", str(lm_run[0]), *args)
    assert_user_error(code, out, err, *needles)
