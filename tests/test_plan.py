"""`adapters plan`: memory predicted from the config alone, checked against real measured peaks."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import msgspec
import pytest
import torch
from test_cli import assert_user_error, run_cli, run_in_process
from test_plugin_kit import Norms

import adapters
from adapters.bench import BenchSettings, run_bench
from adapters.plan import PlanSettings, RunShape, estimate, make_plans, model_shape, peak
from adapters.reports import load_report
from adapters.testing import run_checks
from adapters.text import parse_size

from cli_helpers import bench_case_in_process

DEFAULT_SUITE = ["lora", "lora@nf4", "prefix-tuning", "linear-probe", "full-finetune"]
SUITE_REPORT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "cpu-2core-default-suite.json"
CPU_TARGET_PCT = 15.0
LLAMA_70B = {  # Llama-3-70B's published shape
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


# ------------------------------------------------------------------------------------------------
# Prediction against measurement, on real runs of the real SmolLM2


def bench(**settings) -> dict:
    """`run_bench` (the plan beside each measurement, the report written), each case measured in this process:
    the same measurement as in a worker process (the CPU peak counts the tensors the step uses), without its
    seconds of imports; worker processes are tested in test_bench.py. One timed step and no warm-up: the
    peak is measured on a step after it, with the optimizer's state in place."""
    import adapters.bench.capacity as capacity
    import adapters.bench.runner as runner

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_case", bench_case_in_process)
        patch.setattr(capacity, "run_case", bench_case_in_process)
        return run_bench(BenchSettings.of(**{"steps": 1, "warmup": 0, **settings}), progress=False)


@pytest.fixture(scope="module")
def default_suite_report(tmp_path_factory):
    """The default suite's strategies, measured with the plan beside each."""
    out = tmp_path_factory.mktemp("plan") / "report.json"
    return bench(model="smollm2-135m", strategies=DEFAULT_SUITE, batch_size=2, seq_len=96, output=str(out))


@pytest.mark.parametrize("strategy", DEFAULT_SUITE)
def test_default_suite_prediction_is_within_the_cpu_target(default_suite_report, strategy):
    result = next(r for r in default_suite_report["results"] if r["strategy"] == strategy)
    assert result["status"] == "ok", result.get("message")
    prediction = result["prediction"]
    assert prediction["status"] == "ok"
    measured = result["memory"]["peak_bytes"]
    error = 100 * (prediction["peak_bytes"] - measured) / measured
    assert prediction["error_pct"]["total"] == pytest.approx(error, abs=0.01)
    assert abs(error) <= CPU_TARGET_PCT, f"{strategy}: predicted {prediction['peak_bytes']:,}, measured {measured:,}"
    # Weights, trainable parameters and optimizer state are exact, not just within the target.
    for component in ("base_weights_quantized", "base_weights_unquantized", "trainable_parameters",
                      "optimizer_state"):
        assert prediction["components"][component] == pytest.approx(
            result["memory"]["components"][component], rel=0.01, abs=2**20), component
    assert sum(prediction["components"].values()) == prediction["peak_bytes"]


def test_the_prediction_is_saved_in_the_report_and_printed(default_suite_report):
    from adapters.cli.tables import format_table
    from adapters.reports import load_report

    path = default_suite_report["settings"]["output"]
    assert load_report(path).results[0].prediction.status == "ok"  # loads through the typed report model
    table = format_table(default_suite_report)
    assert "plan MiB (error)" in table and "%)" in table


def test_gradient_checkpointing_predictions_match_measurement(tmp_path):
    report = bench(model="smollm2-135m", strategies=["lora@nf4"], batch_size=2, seq_len=96,
                   gradient_checkpointing=True, output=str(tmp_path / "gc.json"))
    for result in report["results"]:
        assert result["status"] == "ok", result.get("message")
        assert abs(result["prediction"]["error_pct"]["total"]) <= CPU_TARGET_PCT, result["strategy"]


# ------------------------------------------------------------------------------------------------
# The plan command: config only, seconds, components and verdicts


def test_done_when_llama_8b_qlora_answers_within_seconds_with_components_and_a_verdict(tmp_path):
    started = time.perf_counter()
    done = run_cli("plan", "--model", "random:llama-8b", "--strategy", "qlora", "--batch-size", "4",
                   "--seq-len", "2048", "--budget", "24GiB", "--json")
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    (plan,) = result["plans"]
    assert plan["status"] == "ok" and plan["quantization"] == "nf4"
    assert sum(plan["components"].values()) == plan["peak_bytes"]
    assert plan["components"]["base_weights_quantized"] > 0 and plan["components"]["activations"] > 0
    assert plan["budget_bytes"] == 24 * 2**30 and plan["fits"] is False  # 4 x 2048 without checkpointing
    assert plan["max_seq_len"] is not None and plan["max_seq_len"] < 2048
    assert result["seconds"] < 10 and seconds < 60  # the planning itself, and the whole command with imports


def test_a_70b_shape_plans_from_config_json_alone_in_seconds(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    result = make_plans(PlanSettings.of(model=str(tmp_path), strategies=["lora@nf4"], batch_size=1, seq_len=2048,
                                     gradient_checkpointing=True, budget="80GiB"))
    assert result["seconds"] < 5
    (plan,) = result["plans"]
    # 70 B weights in 4 bits, plus the bf16 embeddings and output head: about 37 GiB.
    assert 30 * 2**30 < plan["components"]["base_weights_quantized"] + plan["components"][
        "base_weights_unquantized"] < 40 * 2**30
    assert plan["fits"] is True and plan["max_batch_size"] >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # nothing downloaded or written


def test_qlora_is_planned_below_lora_and_the_embeddings_stay_in_bf16():
    shape = model_shape("random:llama-1b", device="cuda")
    lora = adapters.get_strategy("lora")
    config = lora.config_class()
    plans = {q: estimate(shape, lora, config, RunShape(8, 512, quantization=q)) for q in ("none", "nf4", "int8")}
    assert plans["nf4"].peak_bytes < plans["int8"].peak_bytes < plans["none"].peak_bytes
    embeddings = 128256 * 2048 * 2  # tied with the output head, bf16, never quantized
    assert plans["nf4"].components["base_weights_unquantized"] == pytest.approx(embeddings, rel=0.01)


def test_the_logits_term_has_the_size_the_h200_anchors_show():
    # anchors.md: the [tokens x vocab] logits at vocab 128k cost several GiB; the chunked loss removes them.
    shape = model_shape("random:llama-1b", device="cuda")
    probe = adapters.get_strategy("linear-probe")
    plan = estimate(shape, probe, probe.config_class(), RunShape(8, 512, loss_chunk=0))
    assert plan.components["logits_and_loss"] == 8 * 512 * 128256 * 12  # fp32 log-softmax and two gradients
    assert plan.peak_phase == "loss backward"
    # Chunked, the logits are one chunk's; what stays is the trained head's weight gradient, which each chunk
    # makes (bf16, then fp32) and adds into the one before.
    chunked = estimate(shape, probe, probe.config_class(), RunShape(8, 512, loss_chunk=256))
    head = 128256 * 2048
    assert chunked.components["logits_and_loss"] == 256 * 128256 * 4 + head * (3 * 4 + 2)
    assert chunked.peak_bytes < plan.peak_bytes - 2 * 2**30


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_done_when_the_chunked_loss_cuts_the_logits_term_of_lora_on_smollm2_five_times(capsys, device):
    def plan(*args):
        code, out, err = run_in_process(capsys, "plan", "--model", "smollm2-135m", "--strategy", "lora",
                                        "--batch-size", "4", "--seq-len", "512", "--device", device, "--json", *args)
        assert code == 0, err
        result = json.loads(out)
        return result["loss"], result["plans"][0]

    (whole_path, whole), (chunked_path, chunked) = plan("--loss-chunk", "0"), plan()
    assert whole_path == "model" and chunked_path.startswith("chunked(")
    assert whole["components"]["logits_and_loss"] == 4 * 512 * 49152 * 12  # the 1.12 GiB
    assert chunked["components"]["logits_and_loss"] * 5 <= whole["components"]["logits_and_loss"]
    assert chunked["peak_bytes"] < whole["peak_bytes"]
    assert plan("--loss-chunk", "128")[1]["components"]["logits_and_loss"] < chunked["components"]["logits_and_loss"]


def test_a_negative_loss_chunk_is_a_plan_error(capsys):
    code, out, err = run_in_process(capsys, "plan", "--model", "random:tiny", "--loss-chunk", "-8")
    assert_user_error(code, out, err, "--loss-chunk", "at least 0")


def test_gradient_checkpointing_and_smaller_batches_predict_less():
    shape = model_shape("smollm2-135m", device="cuda")
    lora = adapters.get_strategy("lora")
    config = lora.config_class()

    def total(**changes):
        return estimate(shape, lora, config, dataclasses.replace(RunShape(8, 512), **changes)).peak_bytes

    assert total(gradient_checkpointing=True) < total()
    assert total(batch_size=4) < total() < total(batch_size=16)
    assert total(seq_len=256) < total()


def test_budget_gives_the_largest_batch_and_sequence_that_fit():
    result = make_plans(PlanSettings.of(model="random:llama-1b", strategies=["lora"], batch_size=8, seq_len=512,
                                     budget="24GiB"))
    (plan,) = result["plans"]
    shape = model_shape("random:llama-1b", device="cuda")
    lora = adapters.get_strategy("lora")
    config = lora.config_class()

    def total(batch, seq):
        run = RunShape(batch, seq)
        return sum(peak(shape, run, lora.estimate_memory(shape, config, run))[0].values())

    budget = 24 * 2**30
    assert total(plan["max_batch_size"], 512) <= budget < total(plan["max_batch_size"] + 1, 512)
    assert total(8, plan["max_seq_len"]) <= budget < total(8, plan["max_seq_len"] + 1)
    assert plan["fits"] == (plan["peak_bytes"] <= budget)


def test_strategies_all_is_one_table_of_every_strategy_and_quantization(capsys):
    code, out, err = run_in_process(capsys, "plan", "--model", "random:llama-1b", "--strategies", "all",
                                    "--batch-size", "8", "--budget", "24GiB")
    assert code == 0, err
    for row in ("lora@nf4", "lora@int8", "prefix-tuning@fp4", "linear-probe", "full-finetune"):
        assert f"\n{row} " in out
    assert "\nqlora " not in out  # the alias of lora@nf4 is not listed twice
    assert "fits" in out and "max batch" in out


def test_an_unmodelled_architecture_gets_no_estimate_not_a_guess(tmp_path):
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 256}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    result = make_plans(PlanSettings.of(model=str(tmp_path), strategies=["lora"], batch_size=2, seq_len=64))
    (plan,) = result["plans"]
    assert plan["status"] == "no estimate" and "'gpt2'" in plan["message"]
    assert plan["peak_bytes"] is None


def test_bert_predictions_match_measurement_on_the_real_minilm(tmp_path):
    report = bench(model="minilm-l6", strategies=["lora", "linear-probe", "full-finetune"], batch_size=8,
                   seq_len=64, output=str(tmp_path / "b.json"))
    for result in report["results"]:
        assert result["status"] == "ok", result.get("message")
        assert abs(result["prediction"]["error_pct"]["total"]) <= CPU_TARGET_PCT, result["strategy"]


def test_refusals_are_rows_not_errors():
    result = make_plans(PlanSettings.of(model="random:tiny", strategies=["full-finetune@nf4", "prefix-tuning"],
                                     gradient_checkpointing=True))
    statuses = {p["strategy"]: (p["status"], p["message"]) for p in result["plans"]}
    assert statuses["full-finetune@nf4"][0] == "refused" and "nf4" in statuses["full-finetune@nf4"][1]
    assert statuses["prefix-tuning"][0] == "refused" and "--gradient-checkpointing" in statuses["prefix-tuning"][1]


@pytest.mark.parametrize("args, needles", [
    (["--budget", "24 potatoes"], ["24 potatoes", "24GiB"]),
    (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["--strategy", "lorra"], ["'lorra'", "lora"]),
    (["--model", "no-such-model"], ["'no-such-model'"]),
    (["--strategy", "lora", "--set", "r=zero"], ["r"]),
    (["--strategies", "lora,prefix-tuning", "--set", "rr=8"], ["rr", "num_virtual_tokens"]),
])
def test_user_errors_exit_2_with_one_line(capsys, args, needles):
    code, out, err = run_in_process(capsys, "plan", "--model", "random:tiny", *args)
    assert_user_error(code, out, err, *needles)


@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * 2**30), ("24 GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("512MiB", 512 * 2**20),
    ("1.5G", int(1.5 * 2**30)), ("1000", 1000), ("2T", 2 * 2**40),
])
def test_sizes_read_as_users_write_them(text, expected):
    assert parse_size(text) == expected


# ------------------------------------------------------------------------------------------------
# Third-party strategies: with the hook they are planned; without it they show "no estimate"


class NormTuning(Norms):
    """Trains only the norm weights (the kit's own test strategy), with or without an estimate hook."""

    def __init__(self, name: str, with_estimate: bool) -> None:
        self.name = name
        if with_estimate:
            self.estimate_memory = self._estimate

    def _estimate(self, model, config, run):
        n = sum(p.numel() for name, p in model.meta_model.named_parameters() if "norm" in name)
        return adapters.StrategyMemory(n, n * run.compute_bytes, model.hidden_size * run.compute_bytes,
                                       gradient_flow="inputs", base_parameters_trained=n)


class _NormPlugin:
    @adapters.hookimpl
    def register_strategies(self, register):
        register(NormTuning("norm-tuning", with_estimate=True))
        register(NormTuning("norm-tuning-unplanned", with_estimate=False))


def test_third_party_strategies_appear_in_plan_all(register_plugin):
    register_plugin(_NormPlugin(), name="adapters-norm")
    result = make_plans(PlanSettings.of(model="random:llama-1b", strategies=["all"], budget="24GiB"))
    plans = {p["strategy"]: p for p in result["plans"]}
    assert plans["norm-tuning"]["status"] == "ok" and plans["norm-tuning@nf4"]["status"] == "ok"
    assert plans["norm-tuning"]["trainable_parameters"] == (16 * 2 + 1) * 2048
    unplanned = plans["norm-tuning-unplanned"]
    assert unplanned["status"] == "no estimate" and unplanned["peak_bytes"] is None
    assert "estimate_memory" in unplanned["message"]


def test_the_kit_checks_a_third_party_estimate_against_a_measurement(register_plugin):
    register_plugin(_NormPlugin(), name="adapters-norm")
    report = run_checks("norm-tuning", quantizations=["none"])
    row = next(r for r in report.results if r.check == "memory-estimate")
    assert row.status == "pass", row.detail
    report = run_checks("norm-tuning-unplanned", quantizations=["none"])
    row = next(r for r in report.results if r.check == "memory-estimate")
    assert (row.status, row.detail) == ("skip", "no estimate_memory hook")


def test_the_kit_fails_an_estimate_that_is_far_off(register_plugin):
    class Overstated(NormTuning):
        def _estimate(self, model, config, run):
            part = super()._estimate(model, config, run)
            return dataclasses.replace(part, layer_activation_bytes=10 * 2**20)  # 10 MiB a layer that never exist

    class Plugin:
        @adapters.hookimpl
        def register_strategies(self, register):
            register(Overstated("norm-overstated", with_estimate=True))

    register_plugin(Plugin(), name="adapters-overstated")
    row = next(r for r in run_checks("norm-overstated", quantizations=["none"]).results
               if r.check == "memory-estimate")
    assert row.status == "fail" and "beyond ±15%" in row.detail


# ------------------------------------------------------------------------------------------------
# Capacity search by real runs


def test_find_max_batch_searches_by_real_runs_under_a_cpu_memory_limit(tmp_path):
    # A limit between the peaks at batch 3 and 4: doubling to 4, then a bisection try at 3 that fits.
    report = bench(model="random:tiny", strategies=["lora"], seq_len=64, find_max="batch_size",
                   memory_limit="5MiB", output=str(tmp_path / "cap.json"))
    (search,) = report["capacity"]
    limit = 5 * 2**20
    largest = search["largest"]
    assert largest is not None and search["peak_bytes"] <= limit
    tries = {t["value"]: t for t in search["tries"]}
    assert tries[largest]["status"] == "ok"
    assert tries[largest + 1]["status"] == "over limit" or any(
        v > largest and t["status"] != "ok" for v, t in tries.items())
    assert all(t["status"] == "ok" for v, t in tries.items() if v <= largest)  # doubling, then bisection
    assert all(t["status"] == "over limit" for v, t in tries.items() if v > largest)
    assert search["predicted_largest"] is not None and abs(search["predicted_largest"] - largest) <= max(
        1, largest // 4)
    (result,) = report["results"]
    assert result["status"] == "ok"
    assert result["prediction"]["status"] == "ok"


@pytest.mark.parametrize("args, needles", [
    (["--find-max-batch"], ["--memory-limit"]),  # on the CPU nothing else would stop the search
    (["--find-max-batch", "--find-max-seq-len", "--memory-limit", "1GiB"], ["one of"]),
    (["--find-max-seq-len", "--memory-limit", "lots"], ["lots", "GiB"]),
])
def test_capacity_search_user_errors(capsys, args, needles):
    code, out, err = run_in_process(capsys, "bench", "--model", "random:tiny", "--strategies", "lora", *args)
    assert_user_error(code, out, err, *needles)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_gpu_llama_1b_predictions_are_within_10_percent(tmp_path):
    for checkpointing in (False, True):
        strategies = ["lora", "linear-probe", "full-finetune"] + ([] if checkpointing else ["prefix-tuning"])
        report = run_bench(BenchSettings.of(model="random:llama-1b", strategies=strategies, batch_size=8,
                                         seq_len=512, steps=2, warmup=1, gradient_checkpointing=checkpointing,
                                         output=str(tmp_path / f"gc-{checkpointing}.json")), progress=False)
        for result in report["results"]:
            assert result["status"] == "ok", result.get("message")
            assert result["prediction"]["status"] == "ok", result["prediction"]
            assert abs(result["prediction"]["error_pct"]["total"]) <= 10, (checkpointing, result["strategy"])


def test_find_max_seq_len_doubles_then_bisects_in_multiples_of_8(monkeypatch):
    import adapters.bench.capacity as bench

    peak_per_token = 2**20
    tried = []

    measured = next(r for r in load_report(SUITE_REPORT).results if r.ok)

    def fake_case(spec, measurement):  # stands in for a worker: a peak proportional to the sequence length
        tried.append(spec.seq_len)
        memory = msgspec.structs.replace(measured.memory, peak_bytes=spec.seq_len * peak_per_token)
        return msgspec.structs.replace(measured, strategy=spec.strategy, batch_size=spec.batch_size, memory=memory)

    monkeypatch.setattr(bench, "run_case", fake_case)
    settings = BenchSettings.of(model="random:tiny", strategies=["lora"], find_max="seq_len", memory_limit="300MiB")
    result, search = bench.find_capacity(settings, "lora", 300 * 2**20)
    assert search.largest == 296 and result.memory.peak_bytes == 296 * peak_per_token
    assert tried[:7] == [8, 16, 32, 64, 128, 256, 512] and all(t % 8 == 0 for t in tried)
    assert len(tried) <= 7 + 5  # a bisection over the 32 multiples of 8 between 256 and 512


@pytest.mark.parametrize("model_type", ["qwen2", "gemma"])
def test_other_llama_style_decoders_are_planned_within_the_target(tmp_path, model_type):
    """Local checkpoints of other families (Qwen2 has q/k/v biases, Gemma a GeGLU MLP), without tokenizer files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                                  max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    report = bench(model=str(tmp_path / "model"), strategies=["lora", "full-finetune"], batch_size=4, seq_len=128,
                   output=str(tmp_path / "r.json"))
    for result in report["results"]:
        assert result["status"] == "ok", result.get("message")
        assert result["tokens_per_step"] == 4 * 128
        assert abs(result["prediction"]["error_pct"]["total"]) <= CPU_TARGET_PCT, result["strategy"]
