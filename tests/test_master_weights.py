"""--master-weights none: training in bf16 throughout (no float32 master weights) trains, saves bf16 safetensors that
reload, records its precision, and the plan predicts half the bytes of the weights, gradients and AdamW's states."""
from __future__ import annotations

import math

import pytest
import torch
from run_helpers import assert_reloads_in_bf16, logged

import adapters
from adapters import rules
from adapters.plan import PlanSettings, make_plans

SETTINGS = dict(model="random:tiny", strategy="full-finetune", learning_rate=1e-3, max_steps=4, batch_size=2,
                seq_len=32, eval_batches=1, log_every=1)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    result = adapters.train(adapters.RunSpec(**SETTINGS, master_weights="none", save_every=2, output=str(out)),
                            progress=False)
    assert result.status == "completed", result.reason
    return out, result


def test_it_trains_in_bf16_with_a_finite_falling_loss(bf16_run):
    out, result = bf16_run
    losses = logged(out, "loss")
    assert len(losses) == SETTINGS["max_steps"] and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert result.precision["trainable_dtype"] == ["bfloat16"] and result.precision["master_weights"] == []
    assert result.precision["base_dtype"] == rules.base_dtype("cpu", "none") == "bfloat16"


def test_it_trains_to_the_float32_masters_losses_within_a_stated_tolerance(bf16_run, tmp_path):
    """At this learning rate the updates are far above bf16's resolution, so the losses follow the float32-master
    run's within 1% (SmolLM2 at 5e-5, where many round away, is measured in docs/memory.md, not bounded here)."""
    out, _ = bf16_run
    fp32 = adapters.train(adapters.RunSpec(**SETTINGS, output=str(tmp_path / "fp32")), progress=False)
    assert fp32.status == "completed", fp32.reason
    expected, got = logged(tmp_path / "fp32", "loss"), logged(out, "loss")
    assert got != expected  # it really trained in bf16
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-2, atol=0)


def test_the_saved_weights_are_bf16_safetensors_that_reload(bf16_run):
    out, _ = bf16_run
    assert_reloads_in_bf16(out)


def test_it_resumes_from_a_checkpoint_to_the_same_weights(bf16_run, tmp_path):
    out, _ = bf16_run
    from adapters.resuming import resume_spec

    cut = tmp_path / "cut"
    stopped = adapters.train(adapters.RunSpec(**SETTINGS, master_weights="none", save_every=2, output=str(cut)),
                             progress=False, stop=lambda s: s == 2)
    assert stopped.status == "interrupted"
    assert adapters.train(resume_spec(cut, {}, {}), progress=False).status == "completed"
    assert logged(cut, "loss")[-2:] == logged(out, "loss")[-2:]


def test_the_rules_say_which_dtypes():
    assert rules.weights_dtype("cuda", "fp32") == rules.weights_dtype("cpu", "fp32") == "float32"
    assert rules.weights_dtype("cuda", "none") == rules.weights_dtype("cpu", "none") == "bfloat16"
    assert rules.base_dtype("cpu") == "float32" and rules.base_dtype("cuda") == "bfloat16"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_plan_halves_the_weights_gradients_and_states(device):
    def plan(**changes):
        (one,) = make_plans(PlanSettings.of(model="smollm2-135m", strategies=["full-finetune"], batch_size=2,
                                            seq_len=64, device=device, **changes))["plans"]
        return one

    fp32, none = plan(), plan(master_weights="none")
    for component in ("trainable_parameters", "optimizer_state"):
        assert none["components"][component] * 2 == fp32["components"][component], component
    assert none["peak_bytes"] < fp32["peak_bytes"] * 2 / 3
    both = plan(master_weights="none", optimizer_in_backward=True)
    assert both["peak_bytes"] <= none["peak_bytes"]


def test_the_plan_is_within_the_cpu_target_of_the_measured_peak(tmp_path):
    from test_plan import CPU_TARGET_PCT, bench

    report = bench(model="smollm2-135m", strategies=["full-finetune"], batch_size=2, seq_len=64,
                   master_weights="none", output=str(tmp_path / "report.json"))
    (result,) = report["results"]
    assert result["status"] == "ok", result.get("message")
    assert report["settings"]["dtype"] == "bfloat16"
    error = result["prediction"]["error_pct"]["total"]
    assert abs(error) <= CPU_TARGET_PCT, f"predicted {result['prediction']['peak_bytes']:,}, measured " \
                                         f"{result['memory']['peak_bytes']:,}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_bf16_without_masters_trains_and_saves_bf16(tmp_path):
    result = adapters.train(adapters.RunSpec(**SETTINGS, master_weights="none", output=str(tmp_path / "run")),
                            progress=False)
    assert result.status == "completed", result.reason
    assert result.precision["trainable_dtype"] == ["bfloat16"] and result.precision["master_weights"] == []
    losses = logged(tmp_path / "run", "loss")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
