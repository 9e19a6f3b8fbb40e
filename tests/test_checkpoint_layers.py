"""--checkpoint-layers N: gradient checkpointing of the first N decoder layers alone.

Those layers, and no others, recompute in backward; the run trains to the losses of a run without checkpointing
(the same operations, some done twice), saves and resumes; a count the model cannot take is refused before
anything loads; the plan follows the measured peak as N grows; and --memory-limit checkpoints the fewest layers
that fit, on a real run that stays under its limit."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from run_helpers import logged
from test_fit import measured_peak

import adapters
from adapters.contract import RunShape
from adapters.plan.fit import HEADROOM, fit
from adapters.plan.memory import estimate
from adapters.plan.skeleton import model_shape
from adapters.resolver import resolve
from adapters.training import enable_gradient_checkpointing

from cli_helpers import assert_user_error, run_cli

SETTINGS = dict(model="random:tiny", strategy="lora", learning_rate=1e-3, max_steps=4, batch_size=2, seq_len=32,
                eval_batches=1, log_every=1, save_every=2)


def _mlp_calls(model: torch.nn.Module) -> list[int]:
    """Counts runs of each decoder layer's MLP, recomputations in backward included (see test_training)."""
    calls = []
    for name, mlp in model.named_modules():
        if name.endswith(".mlp") and ".layers." in name:
            calls.append(0)
            index, forward = len(calls) - 1, mlp.forward

            def counted(*args, _index=index, _forward=forward, **kwargs):
                calls[_index] += 1
                return _forward(*args, **kwargs)

            mlp.forward = counted
    return calls


def test_the_first_layers_recompute_and_the_others_do_not():
    base = adapters.load_base_model("random:tiny")
    enable_gradient_checkpointing(base.model, 1)
    strategy = adapters.get_strategy("lora")
    model = strategy.apply(base.model, strategy.config_class())
    calls = _mlp_calls(model)
    model.train()
    ids = torch.randint(3, 200, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [2, 1]  # two layers: the first ran again in backward, the second once
    assert all(p.grad is not None for _, p in adapters.trainable_parameters(model))


def _train(output, **changes) -> adapters.TrainResult:
    result = adapters.train(adapters.RunSpec(**{**SETTINGS, **changes}, output=str(output)), progress=False)
    assert result.status == "completed", result.reason
    return result


def test_it_trains_to_the_losses_without_checkpointing_and_resumes_to_the_same(tmp_path):
    from adapters.resuming import resume_spec

    _train(tmp_path / "plain")
    _train(tmp_path / "partial", checkpoint_layers=1)
    plain, partial = logged(tmp_path / "plain", "loss"), logged(tmp_path / "partial", "loss")
    assert len(partial) == SETTINGS["max_steps"] and partial[-1] < partial[0]
    assert partial == pytest.approx(plain, rel=1e-6, abs=0)
    cut = tmp_path / "cut"
    stopped = adapters.train(adapters.RunSpec(**SETTINGS, checkpoint_layers=1, output=str(cut)), progress=False,
                             stop=lambda s: s == 2)
    assert stopped.status == "interrupted"
    spec = resume_spec(cut, {}, {})
    assert spec.checkpoint_layers == 1 and spec.gradient_checkpointing
    assert adapters.train(spec, progress=False).status == "completed"
    assert logged(cut, "loss")[-2:] == pytest.approx(partial[-2:], rel=1e-6, abs=0)


@pytest.mark.parametrize("args, message", [
    (["--checkpoint-layers", "3"], "random:tiny has 2 decoder layers"),
    (["--checkpoint-layers", "0"], "--checkpoint-layers"),
    (["--checkpoint-layers", "1", "--strategy", "prefix-tuning"], "gradient-checkpointing"),
])
def test_a_count_the_run_cannot_take_is_refused_before_loading(args, message, tmp_path):
    done = run_cli("train", "--model", "random:tiny", "--max-steps", "1", "--output", str(tmp_path / "out"), *args)
    assert_user_error(done.returncode, done.stdout, done.stderr, message)
    assert not (tmp_path / "out").exists()


def test_the_plan_falls_with_each_layer_checkpointed_and_never_counts_more_than_every_layer():
    shape = model_shape("random:llama-1b", device="cuda")
    qlora = adapters.get_strategy("qlora")
    config = qlora.config_class()

    def peak(**changes) -> int:
        run = RunShape(8, 512, quantization="nf4", **changes)
        return estimate(shape, qlora, config, run).peak_bytes

    none, every = peak(), peak(gradient_checkpointing=True)
    partial = [peak(gradient_checkpointing=True, checkpoint_layers=n) for n in range(1, shape.num_layers)]
    assert none > partial[0] and all(a > b for a, b in zip(partial, partial[1:]))
    assert every < partial[0] and peak(gradient_checkpointing=True, checkpoint_layers=shape.num_layers) == every
    # Each layer checkpointed keeps its input where it kept every tensor its backward reads.
    step = partial[0] - partial[1]
    assert all(abs((a - b) - step) <= 1 for a, b in zip(partial, partial[1:]))


def test_the_plan_follows_the_measured_peak(tmp_path):
    from test_plan import CPU_TARGET_PCT, bench

    measured = {}
    for name, changes in {"none": {}, "half": {"checkpoint_layers": 15}}.items():
        report = bench(model="smollm2-135m", strategies=["lora"], batch_size=2, seq_len=96,
                       output=str(tmp_path / f"{name}.json"), **changes)
        (result,) = report["results"]
        assert result["status"] == "ok", result.get("message")
        assert abs(result["prediction"]["error_pct"]["total"]) <= CPU_TARGET_PCT, name
        measured[name] = result["memory"]["peak_bytes"], result["prediction"]["peak_bytes"]
    assert report["settings"]["checkpoint_layers"] == 15
    (none, none_plan), (half, half_plan) = measured["none"], measured["half"]
    # What checkpointing half the layers saved, measured, is what the plan said it would save, within a fifth.
    assert half < none and abs((none - half) - (none_plan - half_plan)) <= 0.2 * (none_plan - half_plan)


def test_on_a_gpu_a_memory_limit_checkpoints_the_fewest_layers_while_that_is_cheaper_than_offload():
    """QLoRA recomputes half a step's compute for each layer checkpointed (its base is frozen): a layer or two of
    16 costs less than offloading the activations (`OFFLOAD_COST`), four cost more."""
    from adapters.plan.fit import CHECKPOINTING_COST, OFFLOAD_COST

    run = resolve(adapters.RunSpec(model="random:llama-1b", strategy="qlora", batch_size=8, seq_len=512), data=False)
    shape = model_shape("random:llama-1b", device="cuda")

    def peak(n: int) -> int:
        shape_of_run = RunShape(8, 512, quantization="nf4", gradient_checkpointing=n > 0, checkpoint_layers=n or None)
        return estimate(shape, run.strategy, run.config, shape_of_run).peak_bytes

    def limit_between(n: int) -> int:  # n layers fit, n - 1 do not
        return int((peak(n - 1) + peak(n)) / 2 / (1 - HEADROOM))

    assert CHECKPOINTING_COST["inputs"] * 2 / 16 < OFFLOAD_COST < CHECKPOINTING_COST["inputs"] * 4 / 16
    chosen = fit(run, limit_between(2), device="cuda").chosen
    assert (chosen.batch_size, chosen.checkpoint_layers, chosen.offload_activations) == (8, 2, False)
    chosen = fit(run, limit_between(4), device="cuda").chosen
    assert (chosen.batch_size, chosen.gradient_checkpointing, chosen.offload_activations) == (8, False, True)


def test_a_run_fitted_with_some_layers_checkpointed_stays_under_its_limit():
    """One row (nothing to accumulate over): between the peaks without checkpointing and with every layer, the fit
    checkpoints some of SmolLM2's 30 layers, and the measured step stays under the limit."""
    asked = adapters.RunSpec(model="smollm2-135m", strategy="lora", batch_size=1, seq_len=384, max_steps=2)
    candidates = fit(resolve(asked, data=False), 2**50, device="cpu").candidates
    none = next(c for c in candidates if not c.gradient_checkpointing).predicted_peak_bytes
    every = next(c for c in candidates if c.gradient_checkpointing).predicted_peak_bytes
    limit = int((none + every) / 2 / (1 - HEADROOM))
    run = resolve(dataclasses.replace(asked, memory_limit=f"{limit}B"))
    assert run.spec.gradient_checkpointing and 0 < run.spec.checkpoint_layers < 30, run.fit["reason"]
    assert "gradient checkpointing of the first" in run.fit["reason"]
    peak = measured_peak(run)
    assert peak <= limit, f"measured {peak:,} over the limit {limit:,} ({run.fit['reason']})"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_compiled_layers_checkpoint_some_of_them_to_the_same_losses(tmp_path):
    """On CUDA the layers run compiled by default: checkpointing inside some of them trains as the run without."""
    plain = _train(tmp_path / "plain", save_every=None)
    partial = _train(tmp_path / "partial", checkpoint_layers=1, save_every=None)
    assert partial.compiled["on"] == plain.compiled["on"]
    ours, theirs = logged(tmp_path / "partial", "loss"), logged(tmp_path / "plain", "loss")
    assert ours == pytest.approx(theirs, rel=0.01)
