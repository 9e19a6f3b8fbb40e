"""--optimizer-in-backward: each weight stepped from its post-accumulate-grad hook gives exactly the plain step's
update, refuses what would need every gradient first, checkpoints its per-weight states as safetensors and resumes
exactly; the plan drops the whole model's gradients."""
from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import assert_user_error, run_in_process
from run_helpers import logged
from safetensors.torch import load_file

import adapters
from adapters import rules
from adapters.errors import AdaptersError
from adapters.plan import PlanSettings, make_plans
from adapters.resuming import resume_spec

# No clipping (the plain run's default would clip), a schedule that changes the rate every step.
SETTINGS = dict(model="random:tiny", strategy="full-finetune", learning_rate=1e-3, max_steps=3, batch_size=2,
                seq_len=32, eval_batches=1, log_every=1, max_grad_norm=0.0, lr_scheduler="cosine", warmup_steps=1)


def train(output, **changes) -> adapters.TrainResult:
    result = adapters.train(adapters.RunSpec(**{**SETTINGS, **changes}, output=str(output)), progress=False)
    assert result.status == "completed", result.reason
    return result


def final_weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "weights.safetensors")


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_in_backward_is_exactly_the_plain_step(kind, tmp_path):
    plain = train(tmp_path / "plain", optimizer=kind)
    hooked = train(tmp_path / "hooked", optimizer=kind, optimizer_in_backward=True)
    assert plain.losses == hooked.losses  # bitwise, every step
    assert hooked.losses[-1] < hooked.losses[0]
    assert logged(tmp_path / "plain", "learning_rate") == logged(tmp_path / "hooked", "learning_rate")  # the schedule stepped alike
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "hooked")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_checkpoints_hold_the_per_weight_states_as_safetensors_and_resume_exactly(tmp_path):
    whole = tmp_path / "whole"
    train(whole, optimizer_in_backward=True, save_every=1)
    checkpoint = whole / "checkpoints" / "step-1"
    assert (checkpoint / "optimizer.safetensors").is_file() and not list(checkpoint.glob("optimizer*.bin"))
    states = load_file(checkpoint / "optimizer.safetensors")
    trained = final_weights(whole)
    assert {k.rpartition("::")[0] for k in states} == set(trained)  # every weight's, by name
    assert json.loads((checkpoint / "optimizer.json").read_text())["param_groups"].keys() == trained.keys()

    cut = tmp_path / "cut"
    stopped = adapters.train(adapters.RunSpec(**SETTINGS, optimizer_in_backward=True, save_every=1, output=str(cut)),
                             progress=False, stop=lambda s: s == 1)
    assert stopped.status == "interrupted"
    resumed = adapters.train(resume_spec(cut, {}, {}), progress=False)
    assert resumed.status == "completed", resumed.reason
    assert logged(cut, "loss")[-2:] == logged(whole, "loss")[-2:]
    a, b = final_weights(whole), final_weights(cut)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The saved result reloads with the weights it trained.
    loaded = dict(adapters.load(str(whole)).model.named_parameters())
    for name, tensor in a.items():
        assert torch.equal(loaded[name].detach().to(tensor.dtype), tensor), name


@pytest.mark.parametrize("flags, needles", [
    (["--gradient-accumulation-steps", "2"], ["--gradient-accumulation-steps 2", "--gradient-accumulation-steps 1"]),
    (["--max-grad-norm", "1.0"], ["--max-grad-norm 1", "--max-grad-norm 0"]),
])
def test_what_needs_every_gradient_is_refused_with_exit_2(capsys, tmp_path, flags, needles):
    code, out, err = run_in_process(capsys, "train", "--model", "random:tiny", "--strategy", "full-finetune",
                                    "--max-steps", "1", "--optimizer-in-backward", *flags,
                                    "--output", str(tmp_path / "run"))
    assert_user_error(code, out, err, "--optimizer-in-backward", *needles)
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_the_refusal_is_one_rule_for_train_plan_and_bench():
    assert rules.in_backward_refusal() is None
    for refused in (dict(gradient_accumulation_steps=4), dict(max_grad_norm=0.5), dict(sharding="fsdp"),
                    dict(processes=2)):
        assert "--optimizer-in-backward" in rules.in_backward_refusal(**refused)
    with pytest.raises(AdaptersError, match="--sharding fsdp"):
        make_plans(PlanSettings.of(model="random:tiny", strategies=["full-finetune"], optimizer_in_backward=True,
                                   sharding="fsdp", processes=2, device="cpu"))
    # Left to its default, clipping gives way in backward (there is no total norm to clip to).
    run = adapters.resolve(adapters.RunSpec(model="random:tiny", strategy="full-finetune", optimizer_in_backward=True),
                           data=False)
    assert run.max_grad_norm == 0


def test_the_plan_drops_the_whole_models_gradients():
    def plan(**changes):
        (one,) = make_plans(PlanSettings.of(model="smollm2-135m", strategies=["full-finetune"], batch_size=2,
                                            seq_len=64, device="cpu", **changes))["plans"]
        return one

    plain, hooked = plan(), plan(optimizer_in_backward=True)
    assert hooked["peak_phase"] != "optimizer step"
    # One gradient at a time, the largest (the tied embedding, a fifth of SmolLM2), not all of them.
    assert hooked["components"]["gradients"] < plain["components"]["trainable_parameters"] / 4
    assert hooked["components"]["optimizer_state"] == plain["components"]["optimizer_state"]
    assert hooked["peak_bytes"] < plain["peak_bytes"]


def test_the_plan_is_within_the_cpu_target_of_the_measured_peak(tmp_path):
    from test_plan import CPU_TARGET_PCT, bench

    report = bench(model="smollm2-135m", strategies=["full-finetune"], batch_size=2, seq_len=64,
                   optimizer_in_backward=True, output=str(tmp_path / "report.json"))
    (result,) = report["results"]
    assert result["status"] == "ok", result.get("message")
    assert report["settings"]["optimizer_in_backward"] is True
    error = result["prediction"]["error_pct"]["total"]
    assert abs(error) <= CPU_TARGET_PCT, f"predicted {result['prediction']['peak_bytes']:,}, measured " \
                                         f"{result['memory']['peak_bytes']:,}"


def test_a_checkpoint_written_before_these_settings_resumes_at_their_defaults(tmp_path):
    cut = tmp_path / "cut"
    adapters.train(adapters.RunSpec(**SETTINGS, save_every=1, output=str(cut)), progress=False, stop=lambda s: s == 1)
    state = cut / "checkpoints" / "step-1" / "state.json"
    written = json.loads(state.read_text())
    for name in ("optimizer_in_backward", "master_weights"):
        del written["spec"][name]
    state.write_text(json.dumps(written))
    resumed = adapters.train(resume_spec(cut, {}, {}), progress=False)
    assert resumed.status == "completed", resumed.reason


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["adamw", "paged_adamw8bit"])
def test_on_cuda_in_backward_is_the_plain_step_with_compiled_layers_and_bf16_autocast(kind, tmp_path):
    plain = train(tmp_path / "plain", optimizer=kind)
    hooked = train(tmp_path / "hooked", optimizer=kind, optimizer_in_backward=True)
    assert hooked.engine["compiled"] == plain.engine["compiled"]
    assert plain.losses == hooked.losses
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "hooked")
    for name in a:
        assert torch.equal(a[name], b[name]), name
