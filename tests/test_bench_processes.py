"""`adapters bench --processes N [--sharding fsdp]`: each strategy measured as one torchrun of N CPU processes
(gloo) and as one of 1, in the same bench: each process's peak, the tokens/s of all of them, the scaling
efficiency, and the plan's prediction of one process's peak beside it; `adapters compare` refuses reports of
different process counts unless asked."""
from __future__ import annotations

import json

import pytest

from adapters.plan import PlanSettings, make_plans
from adapters.reports import load_report

from cli_helpers import assert_user_error, run_captured, run_in_process

CPU_TARGET_PCT = 15.0  # the planner's CPU target (tests/test_plan.py)
TINY = ["--model", "random:tiny", "--batch-size", "1", "--seq-len", "32"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Full fine-tuning of random:tiny benchmarked with 2 processes under FSDP, through the command line."""
    output = tmp_path_factory.mktemp("bench") / "fsdp.json"
    done = run_captured("bench", *TINY, "--strategies", "full-finetune", "--steps", "2", "--warmup", "1",
                        "--processes", "2", "--sharding", "fsdp", "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    return output, done.stdout


def test_bench_records_each_process_peak_all_tokens_and_the_scaling_efficiency(sharded):
    output, _ = sharded
    report = load_report(output)  # through the typed report model
    assert report.settings.processes == 2 and report.settings.sharding == "fsdp"
    assert report.settings.effective_batch_size == 2
    (result,) = report.ok_results()
    assert result.processes == 2
    peaks = result.memory.per_process_peak_bytes
    assert len(peaks) == 2 and result.memory.peak_bytes == max(peaks)
    assert result.tokens_per_step == 2 * 32  # both processes' rows
    scaling = result.scaling
    assert scaling is not None, result.flags
    assert scaling.efficiency == pytest.approx(result.tokens_per_s / (2 * scaling.single_process_tokens_per_s))
    # One process holds the whole model: more than either process of the sharded run keeps.
    assert scaling.single_process_peak_bytes > result.memory.components.trainable_parameters * 4


def test_the_plan_beside_each_sharded_measurement_is_within_the_cpu_target(sharded):
    output, _ = sharded
    (result,) = load_report(output).ok_results()
    prediction = result.prediction
    assert prediction.status == "ok"
    (plan,) = make_plans(PlanSettings.of(model="random:tiny", strategies=["full-finetune"], batch_size=1, seq_len=32,
                                      device="cpu", processes=2, sharding="fsdp"))["plans"]
    assert prediction.peak_bytes == plan["peak_bytes"]  # what `adapters plan --processes 2 --sharding fsdp` says
    assert abs(prediction.error_pct["total"]) <= CPU_TARGET_PCT, (prediction.peak_bytes, result.memory)
    for peak in result.memory.per_process_peak_bytes:
        assert abs(100 * (plan["peak_bytes"] - peak) / peak) <= CPU_TARGET_PCT


def test_the_bench_table_shows_processes_and_scaling(sharded):
    output, stdout = sharded
    result = json.loads(output.read_text())["results"][0]
    assert "tokens/s (2 proc)" in stdout and "peak MiB/proc" in stdout and "scaling (1 proc tokens/s)" in stdout
    assert f"{result['scaling']['efficiency']:.2f} ({result['scaling']['single_process_tokens_per_s']:,.0f})" in stdout


def test_the_markdown_and_html_reports_show_the_processes_each_peak_and_the_scaling(sharded, tmp_path, capsys):
    output, _ = sharded
    result = json.loads(output.read_text())["results"][0]
    code, markdown, err = run_in_process(capsys, "report", str(output), "--format", "markdown")
    assert code == 0, err
    assert "2 processes (FSDP" in markdown and "scaling efficiency" in markdown
    assert f"{result['scaling']['efficiency']:.2f} (1 process:" in markdown
    assert markdown.count("(each: ") == 1  # the one result's two peaks
    page = tmp_path / "report.html"
    code, _, err = run_in_process(capsys, "report", str(output), "--output", str(page))
    assert code == 0, err
    assert "scaling efficiency" in page.read_text()


def test_compare_refuses_different_process_counts_unless_asked(sharded, tmp_path, capsys):
    output, _ = sharded
    one = json.loads(output.read_text())
    one["settings"]["processes"] = 1  # the same suite, recorded as run by one process
    base = tmp_path / "one.json"
    base.write_text(json.dumps(one))
    code, out, err = run_in_process(capsys, "compare", str(base), str(output))
    assert_user_error(code, out, err, str(base), str(output), "ran 1 process(es)", "--allow-different-processes")
    code, out, err = run_in_process(capsys, "compare", str(base), str(output), "--allow-different-processes")
    assert code == 0, err
    assert "processes" in out  # still warned about, as a different setting


@pytest.mark.parametrize("args, needles", [
    (["--processes", "0"], ["--processes must be at least 1"]),
    (["--processes", "2", "--quality-steps", "1"], ["--quality-steps with --processes 2"]),
    (["--processes", "2", "--find-max-batch", "--memory-limit", "1GiB"], ["--find-max-batch/--find-max-seq-len"]),
])
def test_bench_refuses_what_it_cannot_measure_with_several_processes_before_any_work(capsys, tmp_path, args, needles):
    code, out, err = run_in_process(capsys, "bench", *TINY, "--strategies", "lora", *args,
                                    "--output", str(tmp_path / "r.json"))
    assert_user_error(code, out, err, *needles)
    assert not (tmp_path / "r.json").exists()
