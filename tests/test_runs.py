"""Long runs: learning-rate schedules, clipping, checkpoints, exact resume, signals, metrics and trackers.

Every run here is real (random:tiny, CPU, fp32) and goes through the public API (`adapters.train`,
`adapters.RunSpec`, `adapters.checkpoints`) or the command line, in-process through `main` or as a
real subprocess where a real signal has to reach it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import adapters
from adapters.checkpoints import latest_checkpoint
from adapters.cli.tables import train_summary
from adapters.resuming import resume_spec
from adapters.testing import plugin_for

from cli_helpers import assert_user_error, run_in_process

TINY = dict(model="random:tiny", batch_size=2, seq_len=32, eval_batches=1)
TINY_ARGS = ["--model", "random:tiny", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1"]
# Subprocesses: no entry-point plugins, and one thread (see conftest's _one_thread).
SUBPROCESS_ENV = {**os.environ, "ADAPTERS_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}


def run(progress: bool = False, stop=None, **values) -> adapters.TrainResult:
    return adapters.train(adapters.RunSpec(**{**TINY, **values}), progress=progress, stop=stop)


def _refuse_constant(name: str):
    raise ValueError(f"metrics.jsonl holds {name}, which is not strict JSON")


def read_metrics(output: Path) -> list[dict]:
    """Each line of OUTPUT/metrics.jsonl, parsed as strict JSON (NaN and Infinity are refused)."""
    lines = (Path(output) / "metrics.jsonl").read_text().splitlines()
    assert lines, "metrics.jsonl is empty"
    return [json.loads(line, parse_constant=_refuse_constant) for line in lines]


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a base model fails the test: the error must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a base model was loaded before the error")

    monkeypatch.setattr("adapters.training.model.load_base_model", refuse)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapters.trainable_parameters(model)}


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    ids = torch.arange(3, 19).reshape(2, 8)
    return model(input_ids=ids).logits


# --------------------------------------------------------------------------------------------
# 1. Schedules


def expected_lr(kind: str, step: int, lr: float, warmup: int, total: int) -> float:
    """The rate the optimizer holds after ``step`` steps (what the loop logs for that step)."""
    if step < warmup:
        return lr * step / warmup
    if kind == "constant":
        return lr
    progress = (step - warmup) / (total - warmup)
    if kind == "linear":
        return lr * (1 - progress)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(("kind", "warmup"), [
    ("constant", {"warmup_steps": 2}),
    ("linear", {"warmup_steps": 2}),
    ("cosine", {"warmup_steps": 2}),
    ("cosine", {"warmup_ratio": 0.25}),  # ceil(0.25 * 8) = 2 steps
], ids=["constant", "linear", "cosine", "cosine-ratio"])
def test_logged_learning_rates_follow_the_schedule(kind, warmup, tmp_path):
    lr, total = 1e-3, 8
    run(strategy="lora", max_steps=total, learning_rate=lr, lr_scheduler=kind, log_every=1,
        output=str(tmp_path / "out"), **warmup)
    lines = read_metrics(tmp_path / "out")
    assert [line["step"] for line in lines] == list(range(1, total + 1))
    got = [line["learning_rate"] for line in lines]
    want = [expected_lr(kind, k, lr, 2, total) for k in range(1, total + 1)]
    # Warm-up rises linearly from 0 to the full rate.
    assert got[:2] == pytest.approx([lr / 2, lr], rel=1e-9), f"{kind}: warm-up not followed: {got}"
    if kind == "constant":
        assert got[2:] == pytest.approx([lr] * (total - 2), rel=1e-9), got
    else:
        assert all(a > b for a, b in zip(got[1:], got[2:])), f"{kind} does not fall after warm-up: {got}"
        assert got[-1] == pytest.approx(0.0, abs=1e-12), got
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


BAD_VALUES = [
    (["--warmup-steps", "2", "--warmup-ratio", "0.1"], ["--warmup-steps", "--warmup-ratio"]),
    (["--warmup-ratio", "1.5"], ["--warmup-ratio 1.5"]),
    (["--warmup-ratio", "nan"], ["--warmup-ratio"]),
    (["--warmup-steps", "-1"], ["--warmup-steps", "-1"]),
    (["--max-grad-norm", "-1"], ["--max-grad-norm -1"]),
    (["--max-grad-norm", "inf"], ["--max-grad-norm"]),
    (["--weight-decay", "-0.1"], ["--weight-decay -0.1"]),
    (["--learning-rate", "0"], ["--learning-rate 0"]),
    (["--learning-rate", "nan"], ["--learning-rate nan"]),
    (["--eval-every", "0"], ["--eval-every"]),
    (["--log-every", "0"], ["--log-every"]),
    # issue 14, item 11: each of these used to train, or to fail after loading with a traceback.
    (["--learning-rate", "-1"], ["--learning-rate -1"]),
    (["--learning-rate", "0"], ["--learning-rate 0", "would train nothing"]),
    (["--eval-batches", "-1"], ["--eval-batches", "at least 0", "-1"]),
    (["--seed", "-1"], ["--seed", "at least 0", "-1"]),
    (["--seed", str(2**32)], ["--seed", "below 2**32"]),
]


@pytest.mark.parametrize(("args", "needles"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_optimization_values_are_one_line_errors_before_loading(args, needles, capsys, no_loading):
    code, out, err = run_in_process(capsys, "train", *TINY_ARGS, "--max-steps", "2", *args)
    assert_user_error(code, out, err, *needles)


def test_unknown_scheduler_is_a_click_error(capsys, no_loading):
    code, out, err = run_in_process(capsys, "train", *TINY_ARGS, "--lr-scheduler", "exponential")
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert "Invalid value for '--lr-scheduler'" in err
    assert "'exponential'" in err and "cosine" in err


@dataclass
class _NoOptions:
    pass


class _ConstantNorm(adapters.StrategyBase):
    """Trains the final norm; its own schedule is constant, not the core's cosine."""

    name = "constant-norm"
    description = "test strategy with its own learning-rate schedule"
    config_class = _NoOptions
    supported_quantization = frozenset({"none"})
    supported_tasks = frozenset({"causal-lm"})
    default_lr_scheduler = "constant"

    def apply(self, model, config):
        adapters.freeze(model)
        model.get_submodule("model.norm").weight.requires_grad_(True)
        return model


def test_a_strategys_own_schedule_is_used_when_none_is_given(register_plugin, tmp_path):
    register_plugin(plugin_for(_ConstantNorm()), name="constant-norm-plugin")
    lr = 1e-3
    run(strategy="constant-norm", max_steps=4, learning_rate=lr, log_every=1, output=str(tmp_path / "own"))
    assert [line["learning_rate"] for line in read_metrics(tmp_path / "own")] == pytest.approx([lr] * 4)
    # A flag still wins over the strategy's default.
    run(strategy="constant-norm", max_steps=4, learning_rate=lr, log_every=1, lr_scheduler="linear",
        output=str(tmp_path / "flag"))
    got = [line["learning_rate"] for line in read_metrics(tmp_path / "flag")]
    assert got == pytest.approx([lr * 3 / 4, lr / 2, lr / 4, 0.0])
    # A built-in strategy declares nothing: the core's cosine, falling to 0 at the end.
    run(strategy="lora", max_steps=4, learning_rate=lr, log_every=1, output=str(tmp_path / "core"))
    got = [line["learning_rate"] for line in read_metrics(tmp_path / "core")]
    assert got == pytest.approx([expected_lr("cosine", k, lr, 0, 4) for k in range(1, 5)], abs=1e-15)


# --------------------------------------------------------------------------------------------
# 2. Clipping


def test_grad_norm_is_logged_before_clipping_and_clipping_reaches_the_update(tmp_path):
    def grad_norms(max_grad_norm, name):
        run(strategy="full-finetune", max_steps=2, learning_rate=1e-2, max_grad_norm=max_grad_norm, log_every=1,
            output=str(tmp_path / name))
        return [line["grad_norm"] for line in read_metrics(tmp_path / name)]

    loose, tight = grad_norms(1.0, "loose"), grad_norms(1e-3, "tight")
    # Step 1 sees the same weights and batch either way: the logged norm is the norm before clipping.
    assert tight[0] == pytest.approx(loose[0], rel=1e-6)
    assert tight[0] > 1.0, tight  # far above the 1e-3 it was clipped to

    # AdamW divides by the gradient's own scale, so a clip changes an update's size only once the
    # clipped gradient is below Adam's eps (1e-8): clip to 1e-9 and the weights barely move.
    initial = dict(adapters.load_base_model("random:tiny").model.named_parameters())

    def update_norm(max_grad_norm):
        result = run(strategy="full-finetune", max_steps=2, learning_rate=1e-2, max_grad_norm=max_grad_norm)
        trained = weights(result.trained)
        assert set(trained) <= set(initial)
        return torch.sqrt(sum(((w - initial[n].detach()) ** 2).sum() for n, w in trained.items())).item()

    unclipped, clipped = update_norm(0.0), update_norm(1e-9)
    assert unclipped > 0.1, unclipped
    assert clipped < 0.01 * unclipped, (clipped, unclipped)


# --------------------------------------------------------------------------------------------
# 3. Checkpoints


def test_checkpoints_every_n_steps_load_and_the_final_save_is_plain_peft(tmp_path):
    from peft import PeftModel

    out = tmp_path / "out"
    result = run(strategy="lora", max_steps=6, save_every=2, learning_rate=1e-2, output=str(out))
    root = out / "checkpoints"
    steps = [root / f"step-{n}" for n in (2, 4, 6)]
    assert result.checkpoints == steps
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4", "step-6"]
    for n, checkpoint in zip((2, 4, 6), steps):
        for name in ("state.json", "model/adapters.json", "optimizer.bin", "scheduler.bin"):
            assert (checkpoint / name).is_file(), checkpoint / name
        assert json.loads((checkpoint / "state.json").read_text())["position"]["step"] == n
    first, last = (adapters.load(c / "model") for c in (steps[0], steps[-1]))
    expected = logits(result.trained)
    assert torch.equal(logits(last.model), expected)  # the newest checkpoint is the trained model
    assert not torch.allclose(logits(first.model), expected)  # and step 2 is an earlier one
    # The final save is still at OUTPUT, beside the checkpoints, and plain PEFT loads it.
    assert (out / "adapters.json").is_file() and result.output == out
    peft_model = PeftModel.from_pretrained(adapters.load_base_model("random:tiny").model, out)
    assert torch.equal(logits(peft_model), expected)


def test_keep_checkpoints_keeps_only_the_newest(tmp_path):
    out = tmp_path / "out"
    result = run(strategy="lora", max_steps=6, save_every=2, keep_checkpoints=1, output=str(out))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-6"]
    assert result.checkpoints == [out / "checkpoints" / "step-6"]
    adapters.load(out / "checkpoints" / "step-6" / "model")


def test_latest_checkpoint_never_picks_a_partial_one(tmp_path):
    out = tmp_path / "out"
    run(strategy="lora", max_steps=4, save_every=2, output=str(out))
    root = out / "checkpoints"
    assert latest_checkpoint(out) == root / "step-4"
    # A checkpoint being written: a hidden temp directory, even one already holding everything.
    shutil.copytree(root / "step-4", root / ".step-9.tmp-0123abcd")
    # A directory named like a checkpoint without its state: never complete.
    (root / "step-9" / "model").mkdir(parents=True)
    shutil.copy(root / "step-4" / "optimizer.bin", root / "step-9")
    assert latest_checkpoint(out) == root / "step-4"
    # Steps order by number, not by name.
    shutil.copytree(root / "step-4", root / "step-10")
    assert latest_checkpoint(out) == root / "step-10"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


# --------------------------------------------------------------------------------------------
# 4. Exact resume

RESUME_CASES = {
    "lora": dict(strategy="lora"),
    "qlora-nf4": dict(strategy="qlora"),
    "prefix-tuning": dict(strategy="prefix-tuning"),
    "linear-probe": dict(strategy="linear-probe"),
    "full-finetune": dict(strategy="full-finetune"),
    "lora-classification": dict(strategy="lora", task="sequence-classification"),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(case, tmp_path):
    settings = dict(**RESUME_CASES[case], max_steps=4, save_every=2, gradient_accumulation_steps=2,
                    learning_rate=1e-3)
    whole = run(**settings, output=str(tmp_path / "whole"))
    assert whole.status == "completed" and len(whole.losses) == 4

    out = tmp_path / "stopped"
    stopped = run(**settings, output=str(out), stop=lambda step: step == 3)
    assert stopped.status == "interrupted" and stopped.steps == 3
    assert "step 3" in stopped.reason
    assert stopped.checkpoints == [out / "checkpoints" / "step-2", out / "checkpoints" / "step-3"]
    assert stopped.resume_command == f"adapters train --resume {out}"
    assert stopped.output is None and not (out / "adapters.json").exists()

    resumed = adapters.train(resume_spec(out, {}, {}), progress=False)
    assert resumed.status == "completed" and resumed.steps == 4
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-6, rel=0)
    assert resumed.after == pytest.approx(whole.after, abs=1e-6, rel=0)
    got, want = weights(resumed.trained), weights(whole.trained)
    assert set(got) == set(want)
    at_step_3 = weights(adapters.load(out / "checkpoints" / "step-3" / "model").model)
    assert max((want[n] - at_step_3[n]).abs().max().item() for n in want) > 1e-5, "step 4 changed nothing"
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


# --------------------------------------------------------------------------------------------
# 5. --resume and the flags given with it


@pytest.fixture
def stopped_run(tmp_path) -> Path:
    """A lora run with r=4 (as the command line records it), stopped after step 2 of 4."""
    out = tmp_path / "run"
    run(strategy="lora", max_steps=4, save_every=2, options={"r": "4"}, output=str(out), stop=lambda s: s == 2)
    return out


@pytest.mark.parametrize(("args", "needles"), [
    (["--max-steps", "7"], ["--max-steps 7", "which has 4"]),
    (["--set", "r=8"], ["--set r=8", "r=4"]),
    (["--strategy", "qlora"], ["--strategy qlora", "which has lora"]),
], ids=["max-steps", "set-r", "strategy"])
def test_resume_with_a_contradicting_flag_names_both_values(args, needles, stopped_run, capsys, no_loading):
    code, out, err = run_in_process(capsys, "train", "--resume", str(stopped_run), *args)
    assert_user_error(code, out, err, *needles)


def test_resume_with_agreeing_flags_continues_the_run(stopped_run, capsys):
    code, out, err = run_in_process(capsys, "train", "--resume", str(stopped_run), "--max-steps", "4",
                                    "--set", "r=4", "--strategy", "lora", "--model", "random:tiny", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert (stopped_run / "adapters.json").is_file()
    assert [line["step"] for line in read_metrics(stopped_run)] == [2, 4]


@pytest.mark.parametrize("case", ["option-given-as-a-number", "flag-equal-to-the-default-used"])
def test_resume_accepts_a_flag_equal_to_what_the_run_used(case, tmp_path, capsys):
    """A flag that agrees with what the run really used is no contradiction: an option the Python API
    gave as a number and the command line gives as text, or a flag equal to the default it ran with."""
    out = tmp_path / "run"
    options = {"r": 4} if case == "option-given-as-a-number" else {}
    run(strategy="lora", max_steps=4, save_every=2, options=options, output=str(out), stop=lambda s: s == 2)
    args = ["--set", "r=4"] if case == "option-given-as-a-number" else ["--lr-scheduler", "cosine"]
    code, stdout, err = run_in_process(capsys, "train", "--resume", str(out), *args)
    assert code == 0, err
    assert (out / "adapters.json").is_file()


@pytest.mark.parametrize("where", ["empty", "missing", "only-partial"])
def test_resume_without_a_checkpoint_is_an_error(where, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    if where != "missing":
        out.mkdir()
    if where == "only-partial":
        (out / "checkpoints" / "step-2").mkdir(parents=True)
    code, stdout, err = run_in_process(capsys, "train", "--resume", str(out))
    assert_user_error(code, stdout, err, "--resume", str(out))


# --------------------------------------------------------------------------------------------
# 6. Real signals to `python -m adapters train`


@contextlib.contextmanager
def train_process(tmp_path: Path, *args: str):
    """`python -m adapters train ARGS` with stdout and stderr in files; killed if the test leaves it running."""
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout.open("w") as out, stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "adapters", "train", *args], stdout=out, stderr=err,
                                env=SUBPROCESS_ENV, text=True)
        proc.stdout_path, proc.stderr_path = stdout, stderr
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def wait_for(proc, condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}:\n"
                        f"{proc.stdout_path.read_text()}\n{proc.stderr_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.01)


def assert_complete_checkpoints(out: Path) -> list[Path]:
    found = [p for p in (out / "checkpoints").iterdir() if re.fullmatch(r"step-\d+", p.name)]
    assert found
    for checkpoint in found:
        assert (checkpoint / "state.json").is_file(), f"{checkpoint} has no state.json"
    return found


def interrupted_step(stdout: str) -> int:
    match = re.search(r"interrupted after step (\d+)", stdout)
    assert match, stdout
    return int(match.group(1))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_with_a_checkpoint(signum, tmp_path):
    out = tmp_path / "out"
    with train_process(tmp_path, *TINY_ARGS, "--strategy", "lora", "--max-steps", "100000", "--save-every", "5",
                       "--output", str(out)) as proc:
        wait_for(proc, lambda: (out / "checkpoints" / "step-5" / "state.json").is_file(), "checkpoint step-5")
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
    stdout, stderr = proc.stdout_path.read_text(), proc.stderr_path.read_text()
    assert code == 130, (stdout, stderr[-3000:])
    assert "stopping after this step" in stderr
    assert f"resume with: adapters train --resume {out}" in stdout
    step = interrupted_step(stdout)
    assert 5 <= step < 100000
    assert latest_checkpoint(out) == out / "checkpoints" / f"step-{step}"
    assert_complete_checkpoints(out)
    assert not (out / "adapters.json").exists()
    assert "Traceback" not in stderr


def test_sigint_then_resume_on_the_command_line_completes_the_run(tmp_path, capsys):
    out = tmp_path / "out"
    # Steps of 8 micro-batches: the 40 steps outlast the signal by seconds.
    with train_process(tmp_path, *TINY_ARGS, "--strategy", "lora", "--max-steps", "40", "--save-every", "5",
                       "--gradient-accumulation-steps", "8", "--seq-len", "64", "--output", str(out)) as proc:
        wait_for(proc, lambda: latest_checkpoint(out) is not None, "a first checkpoint")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    stdout = proc.stdout_path.read_text()
    assert code == 130, (stdout, proc.stderr_path.read_text()[-3000:])
    assert f"resume with: adapters train --resume {out}" in stdout
    step = interrupted_step(stdout)
    assert step < 40
    assert (out / "checkpoints" / f"step-{step}" / "state.json").is_file()

    code, stdout, err = run_in_process(capsys, "train", "--resume", str(out))
    assert code == 0, err
    assert (out / "adapters.json").is_file()
    adapters.load(out)
    logged = [line["step"] for line in read_metrics(out)]
    assert logged[-1] == 40 and logged == sorted(set(logged)), logged


def test_a_second_sigint_stops_at_once_and_keeps_complete_checkpoints(tmp_path):
    out = tmp_path / "out"
    # Slow steps (32 micro-batches of 8 x 128 tokens): both signals arrive within one step.
    with train_process(tmp_path, *TINY_ARGS, "--strategy", "lora", "--max-steps", "100000", "--save-every", "1",
                       "--gradient-accumulation-steps", "32", "--batch-size", "8", "--seq-len", "128",
                       "--output", str(out)) as proc:
        wait_for(proc, lambda: latest_checkpoint(out) is not None, "a first checkpoint")
        before = latest_checkpoint(out)
        proc.send_signal(signal.SIGINT)
        wait_for(proc, lambda: "send it again" in proc.stderr_path.read_text(), "the first signal's notice",
                 timeout=10)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - sent
    stdout, stderr = proc.stdout_path.read_text(), proc.stderr_path.read_text()
    assert code != 0 and code != 1, (code, stderr[-3000:])  # interrupted, not a failed run
    assert elapsed < 15, elapsed
    # It did not finish the step it was in (about a second long): no checkpoint of it, no summary,
    # no resume line; one short line instead of a traceback.
    assert latest_checkpoint(out) == before, (before, latest_checkpoint(out))
    assert "resume with" not in stdout and "interrupted after" not in stdout, stdout
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last in ("Aborted.", "Interrupted; nothing was saved."), last
    # Every checkpoint it wrote before is complete, and loads.
    assert_complete_checkpoints(out)
    assert not list((out / "checkpoints").glob(".step-*"))
    adapters.load(before / "model")


# --------------------------------------------------------------------------------------------
# 7. metrics.jsonl


def test_metrics_lines_are_strict_json_with_evaluations_when_due(tmp_path):
    run(strategy="lora", max_steps=4, log_every=1, eval_every=2, output=str(tmp_path / "out"))
    lines = read_metrics(tmp_path / "out")
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for line in lines:
        for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s"):
            assert isinstance(line[key], float) and math.isfinite(line[key]), (key, line)
        assert line["tokens_per_s"] > 0 and "non_finite" not in line
        evaluated = line["step"] in (2, 4)
        for key in ("eval_loss", "eval_perplexity"):
            assert (key in line) == evaluated, line
            if evaluated:
                assert isinstance(line[key], float) and line[key] > 0
    assert lines[-1]["eval_perplexity"] == pytest.approx(math.exp(lines[-1]["eval_loss"]))


def test_metrics_default_to_every_tenth_step_and_the_last(tmp_path):
    run(strategy="linear-probe", max_steps=12, output=str(tmp_path / "out"))
    assert [line["step"] for line in read_metrics(tmp_path / "out")] == [10, 12]


# --------------------------------------------------------------------------------------------
# 8. Trackers


def test_tensorboard_writes_event_files_under_output_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    run(strategy="lora", max_steps=3, log_every=1, report_to=["tensorboard"], output=str(out))
    events = sorted((out / "logs").glob("**/events.out.tfevents*"))
    assert events, list((out / "logs").rglob("*"))
    scalars = {}
    for directory in {e.parent for e in events}:
        accumulator = EventAccumulator(str(directory))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [e.step for e in accumulator.Scalars(tag)]
    assert scalars.get("loss") == [1, 2, 3], scalars
    assert scalars.get("learning_rate") == [1, 2, 3], scalars
    assert (out / "adapters.json").is_file()  # the final save kept the logs beside it
    assert (out / "logs").is_dir()


def test_unknown_tracker_is_an_error_before_loading(capsys, no_loading, tmp_path):
    code, out, err = run_in_process(capsys, "train", *TINY_ARGS, "--report-to", "nosuchtracker",
                                    "--output", str(tmp_path / "out"))
    assert_user_error(code, out, err, "--report-to nosuchtracker")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# 9. A loss that is not finite


@pytest.mark.parametrize("strategy", ["lora", "full-finetune"])
def test_a_non_finite_loss_fails_the_run_and_keeps_the_last_good_checkpoint(strategy, tmp_path):
    out = tmp_path / "out"
    result = run(strategy=strategy, max_steps=6, learning_rate=1e30, save_every=1, log_every=1, output=str(out))
    assert result.status == "failed", result.losses
    bad = result.steps  # the step at which the loss, the gradient norm or a weight stopped being finite
    assert bad > 1, "the first step should be fine"
    assert f"step {bad}" in result.reason and "became" in result.reason, result.reason
    assert all(v is not None and math.isfinite(v) for v in result.losses[:bad - 1])
    # No final save; the checkpoints up to the last good step stay.
    assert result.output is None and not (out / "adapters.json").exists()
    kept = [out / "checkpoints" / f"step-{n}" for n in range(1, bad)]
    assert result.checkpoints == kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(p.name for p in kept)
    # metrics.jsonl: strict JSON, and the failing line says the run failed; nothing non-finite as a number.
    failing = read_metrics(out)[-1]
    assert failing["step"] == bad and failing["status"] == "failed", failing
    if result.losses[bad - 1] is None:
        assert failing["loss"] is None and "loss" in failing["non_finite"], failing
    # The last good checkpoint loads, and holds finite weights.
    loaded = adapters.load(kept[-1] / "model")
    broken = [n for n, p in adapters.trainable_parameters(loaded.model) if not torch.isfinite(p).all()]
    assert not broken, f"the kept checkpoint {kept[-1].name} holds non-finite weights: {broken[:5]}"


def test_a_non_finite_loss_exits_1_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_in_process(capsys, "train", *TINY_ARGS, "--strategy", "lora", "--max-steps", "6",
                                       "--learning-rate", "1e30", "--save-every", "1", "--output", str(out))
    assert code == 1, (stdout, err)
    assert "failed: the " in stdout and "became" in stdout and "last checkpoint:" in stdout
    assert "resume with" not in stdout
    assert not (out / "adapters.json").exists()


def _strict_json(text: str) -> dict:
    assert "Traceback" not in text
    return json.loads(text, parse_constant=_refuse_constant)


def test_a_learning_rate_of_1e30_fails_the_run_and_keeps_the_previous_save(tmp_path, capsys):
    """issue 14, item 4: one step at 1e30 leaves finite but huge weights whose held-out loss is NaN.
    The run fails naming that, saves nothing (with --json too), and the earlier save stays."""
    out = tmp_path / "out"
    run(strategy="lora", max_steps=1, output=str(out))
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "metrics.jsonl"}
    for extra in ([], ["--json"]):
        code, stdout, err = run_in_process(capsys, "train", *TINY_ARGS, "--strategy", "lora", "--max-steps", "1",
                                           "--learning-rate", "1e30", "--output", str(out), "--overwrite", *extra)
        assert code == 1, (stdout, err)
        assert "Traceback" not in err
        if extra:
            summary = _strict_json(stdout)
            assert summary["status"] == "failed" and summary["output"] is None
            assert summary["heldout_after"]["loss"] is None and summary["heldout_before"]["loss"] > 0
            reason = summary["reason"]
        else:
            reason = stdout.split("failed: ", 1)[1]
        assert "held-out loss became nan after step 1" in reason and "saved nothing" in reason, reason
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in saved} == saved  # untouched
        failing = read_metrics(out)[-1]
        assert failing["status"] == "failed" and failing["eval_loss"] is None and "eval_loss" in failing["non_finite"]
    loaded = adapters.load(out).model
    assert all(torch.isfinite(p).all() for _, p in adapters.trainable_parameters(loaded))


class _InfiniteSpare(adapters.StrategyBase):
    """Trains the final norm and a spare weight the forward never uses, which starts infinite: the
    loss and the gradient norm stay finite, so only the check of the weights can catch it."""

    name = "infinite-spare"
    description = "test strategy with a non-finite trainable weight"
    config_class = _NoOptions
    supported_quantization = frozenset({"none"})
    supported_tasks = frozenset({"causal-lm"})

    def apply(self, model, config):
        adapters.freeze(model)
        model.get_submodule("model.norm").weight.requires_grad_(True)
        model.get_submodule("model").spare = torch.nn.Parameter(torch.tensor([1.0, float("inf")]))
        return model


def test_a_non_finite_trainable_weight_fails_the_run_naming_it(register_plugin, tmp_path):
    register_plugin(plugin_for(_InfiniteSpare()), name="infinite-spare-plugin")
    out = tmp_path / "out"
    result = run(strategy="infinite-spare", max_steps=2, output=str(out))
    assert result.status == "failed" and result.output is None
    assert all(v is not None for v in result.losses)  # the loss itself stayed finite
    assert "trainable weight model.spare became non-finite by step 2" in result.reason, result.reason
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]


def test_eval_batches_0_leaves_the_heldout_metrics_unmeasured_never_0(tmp_path, capsys):
    """issue 14, item 4: --eval-batches 0 printed a held-out loss of 0.0000."""
    args = ["train", *TINY_ARGS[:-2], "--eval-batches", "0", "--strategy", "lora", "--max-steps", "2",
            "--eval-every", "1", "--log-every", "1"]
    code, stdout, err = run_in_process(capsys, *args, "--json", "--output", str(tmp_path / "json"))
    assert code == 0, err
    summary = _strict_json(stdout)
    assert summary["heldout_before"] == {"loss": None, "perplexity": None} == summary["heldout_after"]
    assert [line["eval_loss"] for line in read_metrics(tmp_path / "json")] == [None, None]
    manifest = json.loads((tmp_path / "json" / "adapters.json").read_text())
    assert manifest["training"]["eval_batches"] == 0
    code, stdout, err = run_in_process(capsys, *args)
    assert code == 0, err
    assert "held-out loss - -> -, perplexity - -> -" in stdout
    assert "0.0000" not in stdout


# --------------------------------------------------------------------------------------------
# 9b. Out of memory in a step


@dataclass
class _TightOptions:
    fits: int = 1  # the most rows a training forward takes before it "runs out of memory"
    error: str = "torch"  # torch: torch.OutOfMemoryError; runtime: a RuntimeError saying "out of memory"; other


class _TightLora(adapters.StrategyBase):
    """LoRA (no dropout) whose training forward fails as a GPU out of memory would, above ``fits`` rows."""

    name = "tight-lora"
    description = "test strategy that runs out of memory above a micro-batch size"
    config_class = _TightOptions
    supported_quantization = frozenset({"none"})
    supported_tasks = frozenset({"causal-lm"})

    def apply(self, model, config):
        lora = adapters.get_strategy("lora")
        model = lora.apply(model, lora.config_class(dropout=0.0))
        forward = model.forward
        tried = model.tried_rows = []

        def limited(*args, **kwargs):
            rows = kwargs["input_ids"].shape[0]
            if model.training:
                tried.append(rows)
                if rows > config.fits:
                    if config.error == "other":
                        raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")
                    message = f"CUDA out of memory. Tried to allocate 2.00 GiB for {rows} rows"
                    raise torch.OutOfMemoryError(message) if config.error == "torch" else RuntimeError(message)
            return forward(*args, **kwargs)

        model.forward = limited
        return model


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(register_plugin, tmp_path):
    """issue 14, item 7: a step that runs out of memory is tried again with half the micro-batch and
    twice the accumulation; the updates equal those of the full batch, on the same data."""
    register_plugin(plugin_for(_TightLora()), name="tight-lora-plugin")
    settings = dict(max_steps=3, batch_size=4, learning_rate=1e-2, log_every=1, eval_batches=0)
    whole = run(strategy="lora", options={"dropout": "0.0"}, **settings)
    out = tmp_path / "out"
    tight = run(strategy="tight-lora", options={"fits": "1"}, output=str(out), **settings)
    assert tight.status == "completed", tight.reason
    # 4 rows fail, 2 rows fail, 1 row fits: then every step runs its batch as 4 pieces of 1.
    assert tight.trained.tried_rows == [4, 2, 1, 1, 1, 1] + [1] * 8
    backoffs = [{"step": 1, "batch_size": 2, "gradient_accumulation_steps": 2, "from_batch_size": 4,
                 "from_gradient_accumulation_steps": 1},
                {"step": 1, "batch_size": 1, "gradient_accumulation_steps": 4, "from_batch_size": 2,
                 "from_gradient_accumulation_steps": 2}]
    assert [{k: v for k, v in b.items() if k != "error"} for b in tight.backoffs] == backoffs
    assert all("out of memory" in b["error"] for b in tight.backoffs)
    assert (tight.batch_size, tight.gradient_accumulation_steps) == (1, 4)
    summary = tight.summary()
    assert summary["oom_backoffs"] == tight.backoffs and summary["batch_size"] == 1
    table = train_summary(tight)
    assert "out of memory at step 1: micro-batch 4 -> 2, accumulation 1 -> 2" in table
    assert "out of memory at step 1: micro-batch 2 -> 1, accumulation 2 -> 4" in table
    # The same examples in each step, and the same updates as one batch of 4.
    assert tight.losses == pytest.approx(whole.losses, abs=1e-5)
    got, want = weights(tight.trained), weights(whole.trained)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    # Recorded in metrics.jsonl (an event line each) and in the manifest.
    lines = read_metrics(out)
    events = [line for line in lines if "event" in line]
    assert [(e["event"], e["step"], e["batch_size"]) for e in events] == [("oom_backoff", 1, 2), ("oom_backoff", 1, 1)]
    assert [line["step"] for line in lines if "event" not in line] == [1, 2, 3]
    training = json.loads((out / "adapters.json").read_text())["training"]
    assert (training["batch_size"], training["gradient_accumulation_steps"]) == (1, 4)
    assert (training["requested_batch_size"], training["requested_gradient_accumulation_steps"]) == (4, 1)
    assert training["oom_backoffs"] == tight.backoffs
    # A checkpoint records the micro-batch that fitted: a resumed run goes on with it.
    cut = tmp_path / "cut"
    stopped = run(strategy="tight-lora", options={"fits": "1"}, output=str(cut), save_every=1,
                  stop=lambda step: step == 1, **settings)
    assert stopped.status == "interrupted" and stopped.backoffs == tight.backoffs
    resumed = adapters.train(resume_spec(cut, {}, {}), progress=False)
    assert resumed.trained.tried_rows == [1] * 8  # steps 2 and 3, four pieces each, no try at 4 rows
    assert resumed.backoffs == tight.backoffs and resumed.gradient_accumulation_steps == 4
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-5)


@pytest.mark.parametrize("error", ["torch", "runtime"])
def test_out_of_memory_at_one_row_fails_cleanly(error, register_plugin, tmp_path, capsys):
    register_plugin(plugin_for(_TightLora()), name="tight-lora-plugin")
    out = tmp_path / "out"
    code, stdout, err = run_in_process(capsys, "train", *TINY_ARGS, "--strategy", "tight-lora", "--set", "fits=0",
                                       "--set", f"error={error}", "--max-steps", "2", "--output", str(out), "--json")
    assert code == 1, (stdout, err)
    summary = _strict_json(stdout)
    assert "Traceback" not in err
    assert summary["status"] == "failed" and summary["output"] is None and summary["steps"] == 0
    assert "out of memory at step 1 even with a micro-batch of 1" in summary["reason"], summary["reason"]
    assert [b["batch_size"] for b in summary["oom_backoffs"]] == [1]  # 2 rows, then 1
    # Nothing but the metrics: no weights, no temp files.
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]
    assert [line.get("event") for line in read_metrics(out)] == ["oom_backoff", "out_of_memory"]


def test_an_error_that_is_not_out_of_memory_is_not_retried(register_plugin, tmp_path):
    register_plugin(plugin_for(_TightLora()), name="tight-lora-plugin")
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        run(strategy="tight-lora", options={"fits": "0", "error": "other"}, max_steps=1)


# --------------------------------------------------------------------------------------------
# 10. No --output


def test_without_output_a_note_comes_first_and_nothing_is_written(tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    done = subprocess.run([sys.executable, "-m", "adapters", "train", *TINY_ARGS, "--strategy", "lora",
                           "--max-steps", "2"], capture_output=True, text=True, env=SUBPROCESS_ENV, cwd=work,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    note = done.stderr.find("nothing of this run will be kept")
    assert note >= 0, done.stderr[-3000:]
    line = next(x for x in done.stderr.splitlines() if "nothing of this run will be kept" in x)
    assert line.startswith("Note: ") and "--output" in line, line
    assert note < done.stderr.find("train lora"), done.stderr[-3000:]  # before training starts
    assert "held-out loss" in done.stdout
    assert list(work.iterdir()) == []


def test_save_every_without_output_is_an_error(capsys, no_loading):
    code, out, err = run_in_process(capsys, "train", *TINY_ARGS, "--save-every", "2")
    assert_user_error(code, out, err, "--save-every", "--output")


# --------------------------------------------------------------------------------------------
# 11. The result


def test_train_result_holds_status_checkpoints_and_a_usable_model(tmp_path):
    out = tmp_path / "out"
    result = run(strategy="lora", max_steps=4, save_every=2, learning_rate=1e-2, output=str(out))
    assert result.status == "completed" and result.reason is None and result.resume_command is None
    assert result.checkpoints == [out / "checkpoints" / "step-2", out / "checkpoints" / "step-4"]
    assert result.steps == 4 and len(result.losses) == 4
    got = logits(result.trained)
    assert got.shape == (2, 8, 512) and torch.isfinite(got).all()
    assert torch.equal(got, logits(adapters.load(out).model))
    summary = result.summary()
    json.dumps(summary, allow_nan=False)
    assert summary["status"] == "completed"
    assert summary["checkpoints"] == [str(c) for c in result.checkpoints]


def test_train_json_has_status_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_in_process(capsys, "train", *TINY_ARGS, "--strategy", "lora", "--max-steps", "4",
                                       "--save-every", "2", "--output", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout, parse_constant=_refuse_constant)
    assert summary["status"] == "completed" and summary["reason"] is None
    assert summary["checkpoints"] == [str(out / "checkpoints" / "step-2"), str(out / "checkpoints" / "step-4")]
    assert summary["output"] == str(out) and summary["resume_command"] is None
