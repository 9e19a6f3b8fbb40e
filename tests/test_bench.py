"""`adapters bench`: one subprocess per strategy, failures isolated, strict and valid reports."""
from __future__ import annotations

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

import jsonschema
import msgspec
import pytest

import adapters
from adapters.bench import BenchSettings, ProfilerUnavailable, cpu_peak_tensor_bytes, run_bench, settings_from
from adapters.bench.measure import measure
from adapters.reports import as_report, compare_reports, schema
from adapters.reports import load_report as typed_report
from adapters.reports import read_report as load_report  # the plain JSON data, checked through the model
from adapters.reports.model import OkResult
from adapters.testing import plugin_for

from cli_helpers import assert_user_error, bench_case_in_process, run_in_process

TINY = dict(model="random:tiny", batch_size=2, seq_len=32, steps=2, warmup=1)
SUITE_REPORT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "cpu-2core-default-suite.json"


def measure_tiny(strategy, **changes):
    """One case of the TINY suite, measured in this process as the worker does."""
    settings = BenchSettings.of(**{**TINY, **changes})
    return measure(settings.case(strategy), settings.measurement())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A real bench of three strategies, written over an earlier report (which --overwrite may replace)."""
    out = tmp_path_factory.mktemp("bench") / "report.json"
    shutil.copy(SUITE_REPORT, out)
    settings = BenchSettings.of(**TINY, strategies=["lora", "full-finetune@nf4", "linear-probe"], quality_steps=2,
                             repeats=2, output=str(out))  # two repeats: two loads, so load time has a spread
    run_bench(settings, progress=False, overwrite=True)
    return out


def test_report_is_strict_json_that_validates_against_the_schema(report):
    text = report.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    jsonschema.validate(data, schema())
    assert load_report(report) == data
    assert [r["strategy"] for r in data["results"]] == ["lora", "full-finetune@nf4", "linear-probe"]
    assert data["provenance"]["versions"]["torch"] and data["settings"]["device"] == "cpu"


def test_a_refused_strategy_is_recorded_and_the_rest_go_on(report):
    results = {r["strategy"]: r for r in json.loads(report.read_text())["results"]}
    refused = results["full-finetune@nf4"]
    assert refused["status"] == "refused" and "lora" in refused["message"]
    assert results["lora"]["status"] == results["linear-probe"]["status"] == "ok"


def test_memory_components_add_up_to_the_measured_peak(report):
    for r in json.loads(report.read_text())["results"]:
        if r["status"] != "ok":
            continue
        memory = r["memory"]
        assert sum(memory["components"].values()) == memory["peak_bytes"]
        assert memory["components"]["activations_and_temporaries"] > 0
        # AdamW keeps two moments per weight, plus a scalar step count per tensor.
        assert memory["components"]["optimizer_state"] == pytest.approx(
            2 * memory["components"]["trainable_parameters"], rel=1e-2)
        assert memory["source"] == "cpu_profiler_allocation_events"


def test_timings_parameters_and_quality_are_measured(report):
    lora = next(r for r in json.loads(report.read_text())["results"] if r["strategy"] == "lora")
    step = lora["step_s"]
    assert 0 < step["min"] <= step["median"] <= step["max"]
    assert lora["tokens_per_s"] == pytest.approx(lora["tokens_per_step"] / step["median"])
    assert lora["tokens_per_step"] == TINY["batch_size"] * TINY["seq_len"]
    assert 0 < lora["trainable_parameters"] < lora["total_parameters"]
    assert lora["declared_trainable_parameters"] == lora["trainable_parameters"]
    assert lora["quality"]["status"] == "ok" and len(lora["quality"]["losses"]) == 2
    assert lora["flags"] == [] or lora["flags"] == ["held-out loss did not decrease over the quality steps"]


def test_existing_report_is_never_overwritten(report):
    before = report.read_bytes()
    with pytest.raises(adapters.AdaptersError, match="exists"):
        run_bench(BenchSettings.of(**TINY, strategies=["lora"], output=str(report)), progress=False)
    assert report.read_bytes() == before


def test_overwrite_replaced_an_earlier_report_atomically(report):
    data = json.loads(report.read_text())
    assert data["settings"]["model"] == "random:tiny" and data["settings"]["output"] == str(report)
    assert [p.name for p in report.parent.iterdir()] == ["report.json"]  # no temp file left behind


@pytest.mark.parametrize("content", ["my thesis\n", '{"results": []}\n', None], ids=["text", "other-json", "dir"])
def test_overwrite_refuses_anything_but_a_report_before_any_work(tmp_path, capsys, content):
    """Issue 14, item 1: --overwrite replaces only an adapters report, recognised by loading as one."""
    target = tmp_path / "thesis.json"
    if content is None:
        target.mkdir()
        (target / "chapter.txt").write_text("x")
    else:
        target.write_text(content)
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    args = ["bench", "--model", "random:tiny", "--strategies", "lora", "--output", str(target)]
    started = time.monotonic()
    code, out, err = run_in_process(capsys, *args, "--overwrite")
    needle = "is a directory" if content is None else "is not a report written by `adapters bench`"
    assert_user_error(code, out, err, str(target), needle)
    if content is not None:
        assert_user_error(*run_in_process(capsys, *args), str(target), "exists", "--overwrite")
    assert time.monotonic() - started < 5  # refused before any model loads
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()) == before


def test_the_load_time_spread_and_what_the_rows_ran_with_are_recorded(report):
    """Issue 14, verdicts: the report holds each run's loads, so compare judges load time by them."""
    for r in json.loads(report.read_text())["results"]:
        if r["status"] == "ok":
            assert len(r["load_s_repeats"]) == 2 and r["load_s_repeats"][0] == r["load_s"]
            assert all(t > 0 for t in r["load_s_repeats"])
            assert (r["batch_size"], r["gradient_accumulation_steps"]) == (TINY["batch_size"], 1)
    same = compare_reports(typed_report(report), typed_report(report))
    assert {row.verdict for row in same.rows if row.metric == "load_time"} == {"noise"}
    assert not [w for w in same.warnings if "settings" in w]  # rows that record what was asked: no mismatch


def test_unknown_strategy_is_refused_before_any_work(tmp_path):
    with pytest.raises(adapters.UnknownStrategyError, match="Did you mean 'lora'"):
        run_bench(BenchSettings.of(**TINY, strategies=["lora", "lorra"], output=str(tmp_path / "r.json")),
                  progress=False)
    assert not (tmp_path / "r.json").exists()


def test_cpu_peak_counts_tensors_alive_before_the_step():
    import torch

    weights = torch.zeros(1024, 1024)  # 4 MiB, alive throughout

    def step():
        temporary = weights * 2  # another 4 MiB at the peak
        return temporary.sum()

    peak = cpu_peak_tensor_bytes(step)
    assert 8 * 2**20 <= peak < 9 * 2**20


def _without_action(monkeypatch):
    from torch.profiler import _memory_profiler

    monkeypatch.delattr(_memory_profiler, "Action")


def _without_memory_profile(monkeypatch):
    from torch.profiler import profile

    owner = next(c for c in profile.__mro__ if "_memory_profile" in vars(c))  # a base class defines it
    monkeypatch.delattr(owner, "_memory_profile")


@pytest.mark.parametrize("remove, missing", [(_without_action, "Action"), (_without_memory_profile, "_memory_profile")])
def test_a_torch_without_the_private_profiler_api_fails_clearly_before_the_step(monkeypatch, remove, missing):
    import torch

    remove(monkeypatch)
    ran = []
    with pytest.raises(ProfilerUnavailable, match=f"torch {re.escape(torch.__version__)} has no usable .*{missing}"):
        cpu_peak_tensor_bytes(lambda: ran.append(1))
    assert ran == []  # refused before the step, not after it ran for nothing


def test_a_case_travels_to_the_worker_as_a_run_spec(tmp_path):
    from adapters.bench.worker import work
    from adapters.files import write_json

    settings = BenchSettings.of(**TINY)
    case, out = tmp_path / "case.json", tmp_path / "result.json"
    write_json(case, {"spec": settings.case("full-finetune@nf4").to_dict(),
                      "measurement": settings.measurement().to_dict()})
    assert work(str(case), str(out)) == 0
    result = json.loads(out.read_text())  # refused by resolve(spec) in the worker, before any model loads
    assert result["strategy"] == "full-finetune@nf4" and result["status"] == "refused"


def test_quantized_base_weights_are_counted_as_quantized():
    components = measure_tiny("lora@nf4").memory.components
    plain = measure_tiny("lora").memory.components
    assert components.base_weights_quantized > 0 and plain.base_weights_quantized == 0
    # 4-bit linear weights take well under a quarter of their fp32 size.
    assert components.base_weights_quantized < 0.3 * (plain.base_weights_unquantized
                                                       - components.base_weights_unquantized)


def test_suite_files_and_flags(tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text('model = "random:tiny"\nstrategies = ["lora", "linear-probe"]\nseq-len = 64\n')
    settings = settings_from(str(suite), {"seq_len": 32})
    assert settings.strategies == ["lora", "linear-probe"] and settings.spec.seq_len == 32
    suite.write_text("stepz = 3\n")
    with pytest.raises(adapters.AdaptersError, match="stepz"):
        settings_from(str(suite), {})
    with pytest.raises(adapters.AdaptersError, match="--steps"):
        settings_from(None, {"steps": 0})


def test_default_suite_names_the_four_strategies_on_the_embedded_model():
    from pathlib import Path

    settings = settings_from(str(Path(__file__).parent.parent / "benchmarks" / "suites" / "default.toml"), {})
    assert settings.spec.model == "smollm2-135m"
    assert {"lora", "prefix-tuning", "linear-probe", "full-finetune"} <= set(settings.strategies)


@dataclass
class _NoOptions:
    pass


class _FakeOOM:
    """Raises CUDA out of memory in apply, as a too-large model would."""

    name = "fake-oom"
    description = "raises CUDA out of memory in apply, as a too-large model would"
    config_class = _NoOptions
    supported_quantization = frozenset({"none"})
    supported_tasks = frozenset({"causal-lm"})

    def apply(self, model, config):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_a_strategy_that_runs_out_of_memory_is_isolated(register_plugin, monkeypatch, tmp_path, capsys):
    """A third-party strategy whose case runs out of memory is recorded as oom; the next one still runs.

    Each case runs the worker's code in this process (worker processes are tested by the fixture
    ``report`` and the Ctrl-C test; a plugin found in them by entry point, in test_example_plugin.py)."""
    import adapters.bench.runner as runner

    register_plugin(plugin_for(_FakeOOM()), name="adapters-fake-oom")
    monkeypatch.setattr(runner, "run_case", bench_case_in_process)
    out = tmp_path / "r.json"
    code, stdout, stderr = run_in_process(capsys, "bench", "--model", "random:tiny", "--strategies",
                                          "fake-oom,linear-probe", "--steps", "1", "--warmup", "0", "--seq-len", "32",
                                          "--output", str(out))
    assert code == 0, stderr
    results = {r["strategy"]: r for r in json.loads(out.read_text())["results"]}
    assert results["fake-oom"]["status"] == "oom" and "20.00 GiB" in results["fake-oom"]["message"]
    assert results["linear-probe"]["status"] == "ok"
    assert "fake-oom" in stdout and "oom" in stdout


class _Undercounting:
    """The built-in LoRA, but declaring one parameter fewer than it trains."""

    def __init__(self):
        from adapters_lora import Lora

        self._lora = Lora()
        self.name, self.description = "lora-undercount", "test strategy with a wrong declaration"
        self.config_class = self._lora.config_class
        self.supported_quantization = self._lora.supported_quantization
        self.supported_tasks = self._lora.supported_tasks

    def apply(self, model, config):
        return self._lora.apply(model, config)

    def expected_trainable_parameters(self, model, config):
        return self._lora.expected_trainable_parameters(model, config) - 1


class _UndercountingPlugin:
    @adapters.hookimpl
    def register_strategies(self, register):
        register(_Undercounting())


def test_a_trainable_count_that_disagrees_with_the_declaration_is_flagged(register_plugin):
    register_plugin(_UndercountingPlugin(), name="undercount-plugin")
    result = measure_tiny("lora-undercount")
    assert result.declared_trainable_parameters == result.trainable_parameters - 1
    assert any("disagrees with the strategy's declared" in f for f in result.flags)


def test_short_data_is_measured_as_train_runs_it_and_flagged(monkeypatch):
    """Data of fewer rows than --batch-size gives train smaller batches; bench measures those, and says so."""
    import adapters.training.session as session

    real = session.make_batches

    def one_row(*args, **kwargs):  # data with a single sequence of seq_len tokens
        data = real(*args, **kwargs)
        return type(data)(**{k: v[:1] for k, v in data.tensors.items()})

    monkeypatch.setattr(session, "make_batches", one_row)
    result = measure_tiny("lora", batch_size=4)
    assert result.tokens_per_step == TINY["seq_len"]  # the one row train would step on, not 4 made up
    assert any("fewer rows than --batch-size 4" in flag for flag in result.flags), result.flags


# --------------------------------------------------------------------------------------------
# Interrupts: the report is always written with what was measured, and the exit code says so


def strict_json(path: Path) -> dict:
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_ctrl_c_in_the_middle_writes_the_report_and_exits_130(tmp_path):
    """Issue 14, item 5: Ctrl-C in the middle recorded cancelled rows but exited 0.

    A real Ctrl-C: SIGINT to the whole process group (the command and its worker), once the first
    strategy's row is in."""
    out, err_path = tmp_path / "r.json", tmp_path / "stderr"
    env = {**os.environ, "ADAPTERS_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "adapters", "bench", "--model", "random:tiny", "--strategies",
                                 "linear-probe,lora,full-finetune", "--steps", "1", "--warmup", "0", "--seq-len", "32",
                                 "--output", str(out)], stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while "1/3" not in err_path.read_text():  # tqdm: the first strategy is done, the second starting
                assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()[-2000:]
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
            stdout, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    stderr = err_path.read_text()
    assert proc.returncode == 130, (stdout, stderr[-3000:])
    assert "Traceback" not in stderr and f"report written to {out}" in stdout
    assert f"Interrupted: the report {out} holds what was measured" in stderr
    data = strict_json(out)
    jsonschema.validate(data, schema())
    report = typed_report(out)
    assert report.interrupted and data["interrupted"] is True
    assert [(r.strategy, r.status) for r in report.results] == [
        ("linear-probe", "ok"), ("lora", "cancelled"), ("full-finetune", "cancelled")]
    measured = report.results[0]
    assert measured.tokens_per_s > 0 and measured.memory.peak_bytes > 0 and measured.load_s_repeats == [measured.load_s]
    assert "interrupted (SIGINT)" in report.results[1].message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "stderr"]


def _measure_here(spec, measurement):
    """The worker's job in this process: the same measurement, without a fresh interpreter's start-up."""
    from adapters.bench.worker import finite

    return finite(measure(spec, measurement))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_predictions_still_writes_the_report(tmp_path, capsys, monkeypatch, signum):
    """Issue 14, item 5: after the last strategy, while predictions ran, Ctrl-C printed "Aborted."
    (exit 130) and wrote no report. Here a real signal reaches the command as the first prediction starts."""
    import adapters.bench.runner as runner

    real_predict, calls = runner.predict, []

    def predict_after_a_signal(spec, result, shapes):
        calls.append(spec.strategy)
        os.kill(os.getpid(), signum)
        return real_predict(spec, result, shapes)

    monkeypatch.setattr(runner, "run_case", _measure_here)
    monkeypatch.setattr(runner, "predict", predict_after_a_signal)
    out = tmp_path / "r.json"
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    code, stdout, stderr = run_in_process(capsys, "bench", "--model", "random:tiny", "--strategies",
                                          "linear-probe,full-finetune@nf4", "--steps", "1", "--warmup", "0",
                                          "--seq-len", "32", "--output", str(out))
    assert code == 130, (stdout, stderr)
    assert {s: signal.getsignal(s) for s in before} == before  # the command's handlers are gone again
    assert calls == ["linear-probe"] and "Aborted." not in stderr and "Traceback" not in stderr
    report = typed_report(out)
    assert report.interrupted
    assert [(r.strategy, r.status) for r in report.results] == [("linear-probe", "ok"),
                                                                ("full-finetune@nf4", "refused")]
    assert report.results[0].prediction.status == "cancelled"
    assert f"report written to {out}" in stdout


def test_a_file_that_appears_at_the_output_during_the_run_is_kept(tmp_path, monkeypatch, capsys):
    """Neither the user's file nor the measurements are lost: the report goes beside it."""
    import adapters.bench.runner as runner

    out = tmp_path / "r.json"

    def measure_while_someone_writes(spec, measurement):
        out.write_text("written by someone else meanwhile\n")
        return _measure_here(spec, measurement)

    monkeypatch.setattr(runner, "run_case", measure_while_someone_writes)
    report = run_bench(BenchSettings.of(**{**TINY, "steps": 1, "warmup": 0}, strategies=["linear-probe"],
                                     output=str(out)), progress=False)
    assert out.read_text() == "written by someone else meanwhile\n"
    moved = tmp_path / "r.1.json"
    assert report["settings"]["output"] == str(moved) and typed_report(moved).results[0].status == "ok"
    assert f"Writing the report to {moved} instead" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Non-finite numbers: null, with a status, never a crashed worker


def _diverging_probe(learning_rate: float = 1e38, nan_in_eval: bool = False):
    """The shipped linear probe, with a learning rate that blows its head up (an Adam step of about 1e38 takes the
    head's weights past float32's range, with no weight decay needed to get there), or a head that gives NaN
    logits in evaluation (held-out quality) while training normally."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins"))
    try:
        from adapters_probe import LinearProbe
    finally:
        sys.path.pop(0)

    class Diverging(LinearProbe):
        name = "nan-in-eval" if nan_in_eval else "diverging-probe"
        description = "test strategy whose numbers stop being finite"
        default_learning_rate = learning_rate

        def apply(self, model, config):
            model = super().apply(model, config)
            if nan_in_eval:
                def nan_when_evaluating(module, args, output):
                    return output if module.training else output * float("nan")

                model.get_output_embeddings().register_forward_hook(nan_when_evaluating)
            return model

    return Diverging()


def _work(tmp_path, strategy: str, **changes) -> dict:
    from adapters.bench.worker import work
    from adapters.files import write_json

    settings = BenchSettings.of(**{**TINY, **changes})
    case, out = tmp_path / "case.json", tmp_path / "result.json"
    write_json(case, {"spec": settings.case(strategy).to_dict(), "measurement": settings.measurement().to_dict()})
    assert work(str(case), str(out)) == 0
    return strict_json(out)


def test_a_loss_that_stops_being_finite_is_a_failed_row_with_a_null_loss(tmp_path, register_plugin):
    """Issue 14, item 4 in bench: a diverging run is recorded as failed, its loss null, not a crashed worker."""
    register_plugin(plugin_for(_diverging_probe()), name="diverging")
    result = _work(tmp_path, "diverging-probe")
    assert result["status"] == "failed" and result.get("final_loss") is None
    assert re.search(r"loss became (nan|inf)", result["message"]), result["message"]


def test_a_held_out_metric_that_is_not_finite_fails_the_quality_not_the_row(tmp_path, register_plugin):
    register_plugin(plugin_for(_diverging_probe(1e-3, nan_in_eval=True)), name="nan-in-eval")
    result = _work(tmp_path, "nan-in-eval", steps=1, warmup=0, quality_steps=1)
    assert result["status"] == "ok" and result["tokens_per_s"] > 0  # speed and memory were measured
    quality = result["quality"]
    assert quality["status"] == "failed" and "nan" in quality["message"].lower(), quality
    assert all(v is None for part in ("before", "after") for v in (quality.get(part) or {}).values())
    assert any("quality" in flag and "nan" in flag.lower() for flag in result["flags"]), result["flags"]


def test_non_finite_numbers_become_null_with_a_status(report):
    """Every place a NaN or infinity can take in a real result: an extra (MFU) is null with a flag,
    the held-out quality fails, anything else fails the row."""
    from adapters.bench.worker import finite

    real = next(r for r in json.loads(report.read_text())["results"] if r["strategy"] == "lora")

    def finite_json(row: dict) -> dict:
        return msgspec.to_builtins(finite(msgspec.convert(row, OkResult)))

    extra = finite_json({**real, "mfu": float("inf")})
    assert extra["status"] == "ok" and extra["mfu"] is None
    assert "non-finite mfu = inf, recorded as null" in extra["flags"]
    quality = finite_json({**real, "quality": {**real["quality"], "after": {**real["quality"]["after"],
                                                                           "loss": math.nan}}})
    assert quality["status"] == "ok" and quality["quality"]["status"] == "failed"
    assert quality["quality"]["after"]["loss"] is None and "quality.after.loss = nan" in quality["quality"]["message"]
    core = finite_json({**real, "final_loss": math.nan, "step_s": {**real["step_s"], "max": math.inf}})
    assert core == {"strategy": "lora", "status": "failed",
                    "message": "non-finite step_s.max = inf, final_loss = nan in the measurement (recorded as failed)"}
    for result in (extra, quality, core):  # strict JSON that loads as a report row
        text = json.dumps(result, allow_nan=False)
        data = {**json.loads(report.read_text()), "results": [json.loads(text)]}
        as_report(data)
