"""--mixed-precision bf16 on the CPU: the GPU's recipe (the base loaded in bf16, bf16 autocast, float32 master
copies of what trains) trains to the float32 run's losses within bf16's rounding, saves what reloads, resumes to
the same losses, and the plan models it within the CPU target of the measured peak."""
from __future__ import annotations

import math

import pytest
import torch
from run_helpers import assert_reloads_in_bf16, logged

import adapters
from adapters import rules
from adapters.plan import PlanSettings, make_plans

SETTINGS = dict(model="random:tiny", strategy="full-finetune", learning_rate=1e-3, max_steps=4, batch_size=2,
                seq_len=32, eval_batches=1, log_every=1, save_every=2)
# random:tiny starts near ln(vocab): bf16's 8-bit mantissa moves each step's loss by well under 1% of it.
LOSS_TOLERANCE = 0.01


def _train(output, **changes) -> adapters.TrainResult:
    result = adapters.train(adapters.RunSpec(**{**SETTINGS, **changes}, output=str(output)), progress=False)
    assert result.status == "completed", result.reason
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    fp32, mixed = tmp_path_factory.mktemp("fp32"), tmp_path_factory.mktemp("mixed")
    return (fp32, _train(fp32)), (mixed, _train(mixed, mixed_precision="bf16"))


def test_it_computes_under_bf16_autocast_with_float32_masters(runs):
    (_, fp32), (_, mixed) = runs
    assert fp32.precision["autocast"] is None and fp32.precision["base_dtype"] == "float32"
    assert mixed.precision["autocast"] == "bf16" and mixed.precision["base_dtype"] == "bfloat16"
    assert mixed.precision["trainable_dtype"] == ["float32"] and mixed.precision["master_weights"] == ["bfloat16"]


def test_it_trains_to_the_float32_runs_losses_within_bf16s_rounding(runs):
    (fp32_out, _), (mixed_out, _) = runs
    fp32, mixed = logged(fp32_out, "loss"), logged(mixed_out, "loss")
    assert len(mixed) == SETTINGS["max_steps"] and all(math.isfinite(x) for x in mixed)
    assert mixed != fp32  # it really computed in bf16
    for a, b in zip(fp32, mixed):
        assert abs(a - b) <= LOSS_TOLERANCE * a, (fp32, mixed)
    assert mixed[-1] < mixed[0]


def test_the_masters_are_saved_in_the_bases_dtype_and_reload(runs):
    """As on a GPU: a completed run rounds its float32 masters to the dtype the base loaded in, bf16, and saves
    those; `adapters.load` (float32 on the CPU) gives them back exactly."""
    _, (out, _) = runs
    assert_reloads_in_bf16(out)


def test_it_resumes_from_a_checkpoint_to_the_same_losses(runs, tmp_path):
    from adapters.resuming import resume_spec

    _, (out, _) = runs
    cut = tmp_path / "cut"
    stopped = adapters.train(adapters.RunSpec(**SETTINGS, mixed_precision="bf16", output=str(cut)), progress=False,
                             stop=lambda s: s == 2)
    assert stopped.status == "interrupted"
    resumed = adapters.train(resume_spec(cut, {}, {}), progress=False)
    assert resumed.status == "completed" and resumed.precision["autocast"] == "bf16"
    assert logged(cut, "loss")[-2:] == logged(out, "loss")[-2:]


def test_a_lora_trained_in_mixed_precision_is_one_plain_peft_loads(tmp_path):
    """LoRA's adapters stay float32 under autocast, on a bf16 base: the save is a plain PEFT adapter, and PEFT on
    the float32 base gives what `adapters.load` gives."""
    from peft import PeftModel

    out = tmp_path / "lora"
    result = _train(out, strategy="lora", mixed_precision="bf16")
    assert result.precision["base_dtype"] == "bfloat16" and result.precision["trainable_dtype"] == ["float32"]
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = adapters.load(str(out)).model.eval()(input_ids=ids).logits
        plain = PeftModel.from_pretrained(adapters.load_base_model("random:tiny").model, out).eval()
        assert torch.equal(plain(input_ids=ids).logits, ours)
        with plain.disable_adapter():
            assert not torch.allclose(plain(input_ids=ids).logits, ours), "training changed nothing"


def test_the_rules_follow_the_device_unless_asked():
    assert rules.autocasts("cuda") and not rules.autocasts("cpu")
    assert rules.autocasts("cpu", "bf16") and not rules.autocasts("cuda", "no")
    assert rules.base_dtype("cpu", "fp32", "bf16") == "bfloat16" and rules.weights_dtype("cpu", "fp32", "bf16") \
        == "float32"
    assert rules.base_dtype("cuda", "fp32", "no") == "float32"


def test_the_plan_counts_a_bf16_base_as_on_cuda():
    def plan(device, **changes):
        (one,) = make_plans(PlanSettings.of(model="smollm2-135m", strategies=["lora"], batch_size=2, seq_len=64,
                                            device=device, compile=False, **changes))["plans"]
        return one

    cpu, mixed, cuda = plan("cpu"), plan("cpu", mixed_precision="bf16"), plan("cuda")
    buffers = 1024  # the rotary embedding's float32 inverse frequencies
    assert abs(mixed["components"]["base_weights_unquantized"] * 2 - cpu["components"]["base_weights_unquantized"]) \
        <= buffers
    assert mixed["components"]["base_weights_unquantized"] == cuda["components"]["base_weights_unquantized"]
    assert mixed["peak_bytes"] < cpu["peak_bytes"]


@pytest.mark.parametrize("strategy", ["full-finetune", "lora"])
def test_the_plan_is_within_the_cpu_target_of_the_measured_peak(strategy, tmp_path):
    from test_plan import CPU_TARGET_PCT, bench

    report = bench(model="smollm2-135m", strategies=[strategy], batch_size=2, seq_len=64, mixed_precision="bf16",
                   output=str(tmp_path / "report.json"))
    (result,) = report["results"]
    assert result["status"] == "ok", result.get("message")
    assert report["settings"]["dtype"] == "bfloat16" and report["settings"]["mixed_precision"] == "bf16"
    error = result["prediction"]["error_pct"]["total"]
    assert abs(error) <= CPU_TARGET_PCT, f"predicted {result['prediction']['peak_bytes']:,}, measured " \
                                         f"{result['memory']['peak_bytes']:,}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_mixed_precision_no_trains_in_float32(tmp_path):
    result = _train(tmp_path / "run", mixed_precision="no")
    assert result.precision["autocast"] is None and result.precision["base_dtype"] == "float32"
    losses = logged(tmp_path / "run", "loss")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
