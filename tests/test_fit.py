"""--memory-limit: the planner fits a run into a limit (adapters.plan.fit), and real runs stay under it.

The peaks are measured as `adapters bench` measures them on the CPU (the profiler's live tensor bytes,
`adapters.bench.profiler.cpu_peak_tensor_bytes`), over a whole optimizer step of the fitted run: its micro-batches
accumulated as the trainer accumulates them (`adapters.training.optimizer_step`), after a first step that put
the optimizer's state in place.
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from adapters.errors import AdaptersError
from adapters.manifest import read_manifest
from adapters.plan.fit import HEADROOM, MemoryLimitTooSmall, fit
from adapters.resolver import resolve
from adapters.runspec import RunSpec

from cli_helpers import assert_user_error, bench_case_in_process, run_in_process


def measured_peak(run) -> int:
    """The CPU peak of one optimizer step of ``run`` as fitted and as the trainer runs it (its optimizer, its loss,
    uncompiled as on the CPU by default): ``gradient_accumulation_steps`` micro-batches of ``batch_size`` rows, the
    second step measured."""
    from adapters.bench.profiler import cpu_peak_tensor_bytes
    from adapters.checkpoints import Position
    from adapters.training import Session

    session = Session.open(run)  # as adapters train opens it
    batches = session.batches(Position.start())
    session.stepper.step(next(batches), 1)
    second = next(batches)
    return cpu_peak_tensor_bytes(lambda: session.stepper.step(second, 2))


def limit_between(spec: RunSpec) -> int:
    """A limit under which the asked batch is predicted not to fit, and a micro-batch of 1 with checkpointing is."""
    candidates = fit(resolve(spec, data=False), 2**50).candidates
    asked = next(c for c in candidates if c.batch_size == spec.batch_size and not c.gradient_checkpointing)
    least = min(c.predicted_peak_bytes for c in candidates)
    return int((least + asked.predicted_peak_bytes) / 2 / (1 - HEADROOM))


# ------------------------------------------------------------------------------------------------
# Real runs under their limit


@pytest.mark.parametrize("model, strategy, batch, seq_len", [
    ("random:tiny", "lora", 8, 64),
    ("random:tiny", "full-finetune", 8, 64),  # every gradient accumulates across the micro-batches
    ("random:tiny", "prefix-tuning", 8, 64),  # it cannot checkpoint: the fit accumulates
])
def test_a_fitted_run_keeps_its_effective_batch_and_stays_under_its_limit(model, strategy, batch, seq_len):
    asked = RunSpec(model=model, strategy=strategy, batch_size=batch, seq_len=seq_len)
    limit = limit_between(asked)
    run = resolve(dataclasses.replace(asked, memory_limit=f"{limit}B"))
    s, record = run.spec, run.fit
    assert s.batch_size * s.gradient_accumulation_steps == batch == record["effective_batch_size"]
    assert (s.batch_size, s.gradient_checkpointing) != (batch, False), "the limit was meant to bind"
    chosen = record["chosen"]
    assert (chosen["batch_size"], chosen["gradient_accumulation_steps"], chosen["gradient_checkpointing"]) == (
        s.batch_size, s.gradient_accumulation_steps, s.gradient_checkpointing)
    assert record["limit_bytes"] == limit and chosen["predicted_peak_bytes"] <= record["usable_bytes"] < limit
    peak = measured_peak(run)
    assert peak <= limit, f"measured {peak:,} over the limit {limit:,} ({record['reason']})"
    # The plan's prediction of the fitted step is what the choice rests on: close to the measurement.
    assert abs(chosen["predicted_peak_bytes"] - peak) <= 0.15 * peak


# ------------------------------------------------------------------------------------------------
# The choice


def test_the_fit_takes_the_fastest_that_fits_and_records_every_candidate():
    spec = RunSpec(model="smollm2-135m", strategy="lora", batch_size=4, gradient_accumulation_steps=2, seq_len=128)
    run = resolve(spec, data=False)
    roomy = fit(run, 2**50, device="cpu")  # everything fits: the asked effective batch whole, no checkpointing
    assert (roomy.chosen.batch_size, roomy.chosen.gradient_accumulation_steps) == (8, 1)
    assert not roomy.chosen.gradient_checkpointing and "fastest" in roomy.reason
    assert {(c.batch_size, c.gradient_checkpointing) for c in roomy.candidates} == {
        (m, gc) for m in (1, 2, 4, 8) for gc in (False, True)}  # the divisors of 8, each with and without
    peaks = {(c.batch_size, c.gradient_checkpointing): c.predicted_peak_bytes for c in roomy.candidates}
    assert all(peaks[(m, True)] < peaks[(m, False)] for m in (1, 2, 4, 8))
    assert peaks[(1, False)] < peaks[(2, False)] < peaks[(4, False)] < peaks[(8, False)]
    # On the CPU, no checkpointing with the largest micro-batch that fits, while one does.
    limit = int((peaks[(4, False)] + peaks[(8, False)]) / 2 / (1 - HEADROOM))
    middle = fit(run, limit, device="cpu").chosen
    assert (middle.batch_size, middle.gradient_checkpointing) == (4, False)
    tight = fit(run, int(peaks[(1, True)] / (1 - HEADROOM)) + 1, device="cpu")  # only the smallest way fits
    assert (tight.chosen.batch_size, tight.chosen.gradient_checkpointing) == (1, True)
    assert "do not fit" in tight.reason
    # On a GPU a micro-step costs more than its tokens: a larger micro-batch with checkpointing can be faster.
    gpu = fit(run, 2**50, device="cuda")
    assert gpu.chosen.batch_size == 8 and not gpu.chosen.gradient_checkpointing
    times = {(c.batch_size, c.gradient_checkpointing): c.predicted_time for c in gpu.candidates}
    assert times[(8, True)] < times[(1, False)]


def test_fitting_a_fitted_spec_chooses_the_same():
    """A bench worker and a resumed run fit the recorded spec again: the choice rests on the effective batch alone."""
    spec = RunSpec(model="smollm2-135m", strategy="lora", batch_size=8, seq_len=128)
    limit = limit_between(spec)
    first = resolve(dataclasses.replace(spec, memory_limit=f"{limit}B"), data=False)
    again = resolve(first.spec, data=False)
    assert again.spec == first.spec
    assert {k: v for k, v in again.fit.items() if k != "asked"} == {k: v for k, v in first.fit.items() if k != "asked"}
    assert first.fit["asked"] == {"batch_size": 8, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
                                  "checkpoint_layers": None, "offload_activations": False}


def test_checkpointing_as_asked_or_as_the_strategy_allows():
    # --gradient-checkpointing with --memory-limit: checkpointing stays on, the fit chooses the micro-batch.
    asked = resolve(RunSpec(model="random:tiny", batch_size=4, gradient_checkpointing=True, memory_limit="1GiB"),
                    data=False)
    assert asked.spec.gradient_checkpointing and asked.spec.batch_size == 4
    assert all(c["gradient_checkpointing"] for c in asked.fit["candidates"])
    # prefix tuning cannot checkpoint: never a candidate with it.
    prefix = fit(resolve(RunSpec(model="random:tiny", strategy="prefix-tuning", batch_size=4), data=False), 2**40)
    assert not any(c.gradient_checkpointing for c in prefix.candidates)


# ------------------------------------------------------------------------------------------------
# Refusals, before any weight loads


@pytest.fixture
def no_loading(monkeypatch):
    """Any load of a base model fails the test."""
    import adapters.training.model

    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(adapters.training.model, "load_base_model", refuse)


def test_a_limit_nothing_fits_under_is_refused_before_loading(capsys, tmp_path, no_loading):
    code, out, err = run_in_process(capsys, "train", "--model", "random:tiny", "--batch-size", "4", "--seq-len", "64",
                                    "--memory-limit", "1MiB", "--output", str(tmp_path / "run"))
    line = assert_user_error(code, out, err, "--memory-limit 1MiB", "too small", "micro-batch 1")
    needed = int(line.split("--memory-limit ")[-1].split("MiB")[0])  # the one fix: the smallest limit that fits
    spec = RunSpec(model="random:tiny", batch_size=4, seq_len=64)
    run = resolve(dataclasses.replace(spec, memory_limit=f"{needed}MiB"), data=False)
    # It fits there (the smallest candidate; on a model this small others may fit within the same MiB), keeping
    # the effective batch.
    assert run.fit is not None and run.spec.batch_size * run.spec.gradient_accumulation_steps == 4
    with pytest.raises(MemoryLimitTooSmall):
        resolve(dataclasses.replace(spec, memory_limit=f"{needed - 1}MiB"), data=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("size", ["lots", "0", "-1GiB"])
def test_a_size_that_cannot_be_read_names_the_flag(capsys, size, no_loading):
    code, out, err = run_in_process(capsys, "train", "--model", "random:tiny", "--memory-limit", size)
    assert_user_error(code, out, err, "--memory-limit")


def test_a_model_the_planner_cannot_predict_is_refused(tmp_path):
    """GPT-2's layers are not modelled: no plan, so no fit, said before anything loads."""
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=256, bos_token_id=0,
                         eos_token_id=0).save_pretrained(tmp_path / "gpt2")  # its config is all a plan reads
    with pytest.raises(AdaptersError, match="--memory-limit: the planner cannot predict lora .* not modelled"):
        resolve(RunSpec(model=str(tmp_path / "gpt2"), memory_limit="1GiB"), data=False)


# ------------------------------------------------------------------------------------------------
# Recorded by the run; bench fits each case the same way


def test_train_records_what_was_chosen_and_why(capsys, tmp_path):
    spec = RunSpec(model="random:tiny", batch_size=8, seq_len=64)
    limit = limit_between(spec)
    out = tmp_path / "run"
    code, stdout, err = run_in_process(capsys, "train", "--model", "random:tiny", "--batch-size", "8", "--seq-len",
                                       "64", "--max-steps", "1", "--eval-batches", "0", "--memory-limit", f"{limit}B",
                                       "--output", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["batch_size"] * summary["gradient_accumulation_steps"] == 8 and summary["batch_size"] < 8
    fitted = read_manifest(out).training["memory_fit"]
    assert fitted["chosen"]["batch_size"] == summary["batch_size"] and fitted["effective_batch_size"] == 8
    assert len(fitted["candidates"]) >= 4 and fitted["reason"]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (event,) = [e for e in events if e.get("event") == "memory_fit"]
    assert event["chosen"] == fitted["chosen"] and event["limit_bytes"] == limit


def bench(**settings) -> dict:
    """`run_bench` with each case measured in this process (as tests/test_plan.py does)."""
    import adapters.bench.capacity as capacity
    import adapters.bench.runner as runner
    from adapters.bench import run_bench
    from adapters.bench.settings import BenchSettings

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_case", bench_case_in_process)
        patch.setattr(capacity, "run_case", bench_case_in_process)
        return run_bench(BenchSettings.of(**{"steps": 1, "warmup": 0, **settings}), progress=False)


def test_bench_fits_each_case_and_agrees_with_the_capacity_search(tmp_path):
    """The capacity search (real runs, doubling then bisecting) is the reference: the largest micro-batch the fit
    predicts to fit without checkpointing is never larger than the largest batch that really fits, nor far below."""
    spec = RunSpec(model="random:tiny", strategy="lora", batch_size=4, seq_len=64)
    limit = limit_between(spec)
    run = resolve(dataclasses.replace(spec, memory_limit=f"{limit}B"), data=False)
    common = {"model": "random:tiny", "strategies": ["lora"], "seq_len": 64, "memory_limit": f"{limit}B"}
    (row,) = bench(batch_size=4, output=str(tmp_path / "fit.json"), **common)["results"]
    assert row["status"] == "ok", row.get("message")
    assert row["memory"]["peak_bytes"] <= limit
    assert row["batch_size"] == run.spec.batch_size < 4  # the measured row ran the chosen micro-batch
    assert row["prediction"]["status"] == "ok" and abs(row["prediction"]["error_pct"]["total"]) <= 15
    (search,) = bench(find_max="batch_size", output=str(tmp_path / "cap.json"), **common)["capacity"]
    largest_predicted = max(c["batch_size"] for c in run.fit["candidates"]
                            if c["fits"] and not c["gradient_checkpointing"])
    assert largest_predicted <= search["largest"] < 4 * largest_predicted, (search["tries"], run.fit["reason"])


def test_under_a_launcher_each_process_fits_its_own_part(monkeypatch):
    """torchrun and `accelerate launch` say how many processes they started (WORLD_SIZE): each fits its rows and, with
    --sharding fsdp, its shard, as `adapters plan --processes N` predicts it. Under a limit that full fine-tuning's
    whole batch does not fit in one process, the sharded processes fit it; data parallel adds gradient buckets."""
    spec = RunSpec(model="smollm2-135m", strategy="full-finetune", batch_size=8, seq_len=64)

    def whole_batch_peak(run_spec: RunSpec) -> int:
        candidates = fit(resolve(run_spec, data=False), 2**50, device="cpu").candidates
        return next(c.predicted_peak_bytes for c in candidates if c.batch_size == 8 and not c.gradient_checkpointing)

    alone = whole_batch_peak(spec)
    monkeypatch.setenv("WORLD_SIZE", "2")
    sharded_spec = dataclasses.replace(spec, sharding="fsdp")
    sharded, parallel = whole_batch_peak(sharded_spec), whole_batch_peak(spec)
    assert sharded < 0.75 * alone and parallel > alone  # half of the weights, gradients and AdamW's state; buckets
    limit = int((sharded + alone) / 2 / (1 - HEADROOM))
    chosen = fit(resolve(sharded_spec, data=False), limit, device="cpu").chosen
    assert (chosen.batch_size, chosen.gradient_checkpointing) == (8, False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(MemoryLimitTooSmall):  # one process alone fits no way of this run under it
        fit(resolve(spec, data=False), limit, device="cpu")


def test_on_a_gpu_the_fit_offloads_before_it_checkpoints_and_does_both_when_neither_fits_alone():
    """On CUDA the fit also weighs saved activations offloaded to host memory (adapters.training.offload): predicted
    cheaper than checkpointing, so chosen first when the batch does not fit as it is; both when only both fit.
    The plan of an offloaded run keeps one layer's saved activations on the device (random:llama-1b, 4 x 1024)."""
    from adapters.plan import PlanSettings, make_plans
    from adapters.plan.fit import OFFLOAD_COST

    spec = RunSpec(model="random:llama-1b", strategy="lora", batch_size=4, seq_len=1024)
    run = resolve(spec, data=False)
    peaks = {(c.batch_size, c.gradient_checkpointing, c.offload_activations): c.predicted_peak_bytes
             for c in fit(run, 2**50, device="cuda").candidates}
    plain, offloaded, checkpointed, both = (peaks[(4, gc, off)] for gc, off in
                                            ((False, False), (False, True), (True, False), (True, True)))
    assert both < offloaded < plain and both < checkpointed < plain
    chosen = fit(run, int((offloaded + plain) / 2 / (1 - HEADROOM)), device="cuda").chosen
    assert (chosen.batch_size, chosen.gradient_checkpointing, chosen.offload_activations) == (4, False, True)
    chosen = fit(run, int((both + min(offloaded, checkpointed)) / 2 / (1 - HEADROOM)), device="cuda").chosen
    assert chosen.offload_activations and (chosen.gradient_checkpointing or chosen.batch_size < 4)
    assert OFFLOAD_COST < 1 / 3  # cheaper than recomputing each layer's forward
    assert fit(run, 2**50, device="cpu").candidates and not any(
        c.offload_activations for c in fit(run, 2**50, device="cpu").candidates)  # the CPU never offloads
    plans = {p["strategy"]: p for p in make_plans(PlanSettings.of(model="random:llama-1b", batch_size=4,
                                                                  seq_len=1024, offload_activations=True))["plans"]}
    assert plans["lora"]["peak_bytes"] == offloaded


def test_offload_is_planned_on_cuda_only(capsys):
    code, out, err = run_in_process(capsys, "plan", "--model", "random:tiny", "--device", "cpu",
                                    "--offload-activations")
    assert_user_error(code, out, err, "--device cpu", "--offload-activations")
    code, out, _ = run_in_process(capsys, "plan", "--model", "random:tiny", "--device", "cuda",
                                  "--offload-activations", "--json")
    assert code in (0, None) and json.loads(out)["offload_activations"] is True
