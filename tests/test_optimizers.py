"""The optimizers a run may ask for (`--optimizer`, adapters.rules.OPTIMIZERS): bitsandbytes' 8-bit AdamW trains
like torch's AdamW, resumes exactly from its checkpoints, and the planner counts its smaller states."""
from __future__ import annotations

import pytest
import torch
from run_helpers import logged
from safetensors.torch import load_file

import adapters
from adapters import rules
from adapters.plan import PlanSettings, make_plans
from adapters.resuming import resume_spec

SETTINGS = dict(model="random:tiny", strategy="full-finetune", learning_rate=1e-3, max_steps=3, batch_size=2,
                seq_len=32, eval_batches=1, save_every=1, log_every=1)


@pytest.fixture(scope="module")
def adamw(tmp_path_factory):
    out = tmp_path_factory.mktemp("adamw")
    result = adapters.train(adapters.RunSpec(**SETTINGS, output=str(out)), progress=False)
    assert result.status == "completed", result.reason
    return out


@pytest.mark.parametrize("kind", ["adamw8bit", "paged_adamw8bit"])
def test_an_8bit_adamw_trains_like_adamw_and_resumes_exactly(kind, adamw, tmp_path):
    whole = tmp_path / "whole"
    result = adapters.train(adapters.RunSpec(**SETTINGS, optimizer=kind, output=str(whole)), progress=False)
    assert result.status == "completed", result.reason
    assert result.engine["optimizer"] == kind
    # The same losses as float32 AdamW's, within the 8-bit states' rounding (blockwise, 256 weights a block):
    # the first step's loss is before any update, so equal; later ones within 2%.
    got, expected = logged(whole, "loss"), logged(adamw, "loss")
    assert len(got) == 3 and got[0] == pytest.approx(expected[0], rel=1e-6)
    assert got[-1] < got[0]  # it learned
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-2, atol=0)
    # Stopped after a step and resumed from the checkpoint, its states restored: the same weights at step 3.
    cut = tmp_path / "cut"
    stopped = adapters.train(adapters.RunSpec(**SETTINGS, optimizer=kind, output=str(cut)), progress=False,
                             stop=lambda s: s == 1)
    assert stopped.status == "interrupted"
    resumed = adapters.train(resume_spec(cut, {}, {}), progress=False)
    assert resumed.status == "completed", resumed.reason
    a = load_file(whole / "checkpoints" / "step-3" / "model" / "weights.safetensors")
    b = load_file(cut / "checkpoints" / "step-3" / "model" / "weights.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # And the saved result reloads with the weights it trained.
    loaded = dict(adapters.load(str(whole)).model.named_parameters())
    final = load_file(whole / "weights.safetensors")
    assert final.keys() <= loaded.keys()
    for name, tensor in final.items():
        assert torch.equal(loaded[name].detach().to(tensor.dtype), tensor), name


def test_the_plan_counts_8bit_states_at_about_a_quarter_of_adamws():
    plans = {kind: make_plans(PlanSettings.of(model="random:tiny", strategies=["full-finetune"], batch_size=2,
                                              seq_len=32, optimizer=kind, device="cpu"))
             for kind in rules.OPTIMIZERS}
    state = {k: p["plans"][0]["components"]["optimizer_state"] for k, p in plans.items()}
    assert plans["adamw8bit"]["engine"]["optimizer"] == "adamw8bit"
    assert state["adamw8bit"] == state["paged_adamw8bit"]
    assert 0.25 < state["adamw8bit"] / state["adamw"] < 0.26


@pytest.mark.parametrize("kind", ["adamw8bit"])
def test_the_plan_of_an_8bit_run_is_within_the_cpu_target_of_its_measured_peak(kind, tmp_path):
    from test_plan import CPU_TARGET_PCT, bench

    report = bench(model="smollm2-135m", strategies=["full-finetune"], batch_size=2, seq_len=64,
                   optimizer=kind, output=str(tmp_path / "report.json"))
    (result,) = report["results"]
    assert result["status"] == "ok", result.get("message")
    prediction, measured = result["prediction"], result["memory"]
    assert prediction["status"] == "ok", prediction.get("message")
    error = 100 * (prediction["peak_bytes"] - measured["peak_bytes"]) / measured["peak_bytes"]
    assert abs(error) <= CPU_TARGET_PCT, f"{kind}: predicted {prediction['peak_bytes']:,}, measured {measured['peak_bytes']:,}"
    assert prediction["components"]["optimizer_state"] == pytest.approx(
        measured["components"]["optimizer_state"], rel=0.05), "optimizer_state"


def test_make_optimizer_takes_parameter_groups_each_with_its_own_lr():
    from adapters import engine

    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    for kind in rules.OPTIMIZERS:
        optimizer = engine.make_optimizer([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1, device="cpu",
                                          kind=kind)
        assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.5], kind


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["adamw8bit", "paged_adamw8bit"])
def test_an_8bit_adamw_trains_on_cuda_and_its_plan_counts_it(kind, tmp_path):
    run = adapters.train(adapters.RunSpec(**{**SETTINGS, "save_every": None}, optimizer=kind,
                                          output=str(tmp_path / "run")), progress=False)
    assert run.status == "completed", run.reason
    assert run.engine["optimizer"] == kind
    losses = logged(tmp_path / "run", "loss")
    assert losses[-1] < losses[0]
