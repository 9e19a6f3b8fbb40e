"""`adapters compare`: verdicts against noise, --fail-on, comparability warnings, --reference, user errors."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import jsonschema
import pytest

from adapters.cli import main as cli_main
from adapters.errors import AdaptersError
from adapters.reports import METRICS, compare_reports, relative_to, schema

MiB = 2**20


def result(strategy: str, median: float = 0.1, spread: float = 0.1, peak_mib: float = 100, load_s: float = 2.0,
           loss: float | None = 3.0, accuracy: float | None = None, tokens_per_step: int = 256,
           loads: list[float] | None = None, **ran_with) -> dict:
    """An ok result whose steps took ``median`` ± ``spread``/2 (relative) seconds; ``loads`` are the
    load times after the first (``load_s``), absent as in older reports; ``ran_with`` the batch_size
    and gradient_accumulation_steps it records having run with."""
    low, high = median * (1 - spread / 2), median * (1 + spread / 2)
    peak = int(peak_mib * MiB)
    after = {"loss": loss} if loss is not None else {}
    if accuracy is not None:
        after["accuracy"] = accuracy
    return {
        "strategy": strategy, "name": strategy.split("@")[0], "quantization": "none", "task": "causal-lm",
        "status": "ok", "message": None, "load_s": load_s,
        "step_s": {"median": median, "min": low, "max": high, "spread": (high - low) / median,
                   "repeat_medians": [median]},
        "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / median,
        "trainable_parameters": 1000, "total_parameters": 10000, "final_loss": 3.0,
        "memory": {"peak_bytes": peak, "source": "cuda_max_memory_allocated",
                   "components": {"base_weights_quantized": 0, "base_weights_unquantized": peak // 2,
                                  "trainable_parameters": 0, "gradients": 0, "optimizer_state": 0,
                                  "activations_and_temporaries": peak - peak // 2},
                   "peak_rss_bytes": peak, "reserved_bytes": peak, "nvml_used_bytes": None},
        "mfu": None, "energy_j_per_token": None,
        "quality": {"steps": 3, "status": "ok", "before": {"loss": 4.0}, "after": after} if after else None,
        "flags": [],
        **({"load_s_repeats": [load_s, *loads]} if loads is not None else {}), **ran_with,
    }


def failed(strategy: str, status: str = "oom") -> dict:
    return {"strategy": strategy, "status": status, "message": f"{strategy} {status}"}


def report(*results: dict, gpu: str | None = "NVIDIA H100 80GB HBM3", gpu_count: int = 1, dirty: bool = False,
           versions: dict | None = None, **settings) -> dict:
    """A schema-valid report holding ``results``."""
    data = {
        "schema_version": 1, "created": "2026-01-01T00:00:00+00:00",
        "provenance": {
            "commit": "0123456789abcdef0123456789abcdef01234567", "dirty": dirty, "command": ["adapters", "bench"],
            "seed": 0,
            "versions": {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0", "bitsandbytes": "0.48.0",
                         "accelerate": "1.15.0", **(versions or {})},
            "plugins": {}, "python": "3.11.7", "os": "Linux", "cpu": {"model": "AMD EPYC", "cores": 16},
            "gpu": {"name": gpu, "count": gpu_count, "memory_bytes": 80 * 2**30} if gpu else None,
        },
        "settings": {"model": "smollm2-135m", "strategies": [r["strategy"] for r in results], "task": None,
                     "batch_size": 2, "gradient_accumulation_steps": 1, "effective_batch_size": 2, "seq_len": 128,
                     "steps": 10, "warmup": 1, "repeats": 3, "gradient_checkpointing": False, "seed": 0,
                     "quality_steps": 3, "dtype": "bfloat16", "device": "cuda", **settings},
        "results": list(results),
    }
    data["settings"]["effective_batch_size"] = (data["settings"]["batch_size"]
                                                * data["settings"]["gradient_accumulation_steps"])
    jsonschema.validate(data, schema())
    return data


def write(tmp_path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        cli_main(["compare", *args])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADAPTERS_LOAD_PLUGINS": ""}
    return subprocess.run([sys.executable, "-m", "adapters", "compare", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def assert_user_error(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------
# Verdicts


def test_identical_reports_are_all_noise_without_warnings():
    r = report(result("lora"), result("lora@nf4", median=0.2))
    c = compare_reports(r, copy.deepcopy(r))
    assert c.warnings == []
    assert c.strategies == ["lora", "lora@nf4"]
    assert {row.verdict for row in c.rows} == {"noise"}
    assert {row.metric for row in c.rows} == {"tokens_per_s", "step_time", "peak_memory", "load_time",
                                              "heldout_loss"}  # mfu and energy are null in both: no row


def test_faster_steps_are_better_in_both_directions_and_slower_worse():
    base = report(result("lora", median=0.100, spread=0.05))
    fast = report(result("lora", median=0.080, spread=0.05))
    c = compare_reports(base, fast)
    tps, step = c.row("lora", "tokens_per_s"), c.row("lora", "step_time")
    assert (tps.verdict, tps.mark, tps.direction) == ("better", "+", "higher is better")
    assert tps.ratio == pytest.approx(1.25)
    assert (step.verdict, step.mark, step.direction) == ("better", "+", "lower is better")
    assert step.ratio == pytest.approx(0.8)
    c = compare_reports(fast, base)
    assert c.row("lora", "tokens_per_s").verdict == c.row("lora", "step_time").verdict == "worse"
    assert c.row("lora", "tokens_per_s").mark == "!"


def test_timed_noise_comes_from_the_step_time_ranges():
    base_noisy = report(result("lora", median=0.100, spread=0.20))  # steps 0.090..0.110
    new_noisy = report(result("lora", median=0.108, spread=0.20))  # 0.0972..0.1188: overlaps
    c = compare_reports(base_noisy, new_noisy)
    assert c.row("lora", "tokens_per_s").verdict == "noise"
    assert c.row("lora", "step_time").verdict == "noise"
    assert c.row("lora", "tokens_per_s").mark == "~"
    # The same 8% change from tight runs (±1%) is real.
    c = compare_reports(report(result("lora", median=0.100, spread=0.02)),
                        report(result("lora", median=0.108, spread=0.02)))
    assert c.row("lora", "tokens_per_s").verdict == c.row("lora", "step_time").verdict == "worse"
    band = c.row("lora", "step_time").noise_band
    assert band == pytest.approx([0.98, 1.01 / 0.99])  # the floor, or where the two ranges stop overlapping
    # Exact step times (no spread) still allow ±2% of drift.
    c = compare_reports(report(result("lora", median=0.100, spread=0.0)),
                        report(result("lora", median=0.1015, spread=0.0)))
    assert c.row("lora", "step_time").verdict == "noise"
    assert c.row("lora", "step_time").noise_band == pytest.approx([0.98, 1.02])


def test_untimed_metrics_use_fixed_tolerances_in_their_direction():
    base = report(result("lora", peak_mib=100, loss=3.0, accuracy=0.50))
    noise = report(result("lora", peak_mib=100.5, loss=3.02, accuracy=0.503))
    c = compare_reports(base, noise)
    for metric in ("peak_memory", "heldout_loss", "accuracy"):
        assert c.row("lora", metric).verdict == "noise", metric
    worse = report(result("lora", peak_mib=105, loss=3.2, accuracy=0.45))
    c = compare_reports(base, worse)
    for metric in ("peak_memory", "heldout_loss", "accuracy"):
        assert c.row("lora", metric).verdict == "worse", metric
    better = report(result("lora", peak_mib=95, loss=2.8, accuracy=0.55))
    c = compare_reports(base, better)
    for metric in ("peak_memory", "heldout_loss", "accuracy"):
        assert c.row("lora", metric).verdict == "better", metric
    assert c.row("lora", "accuracy").direction == "higher is better"
    assert c.row("lora", "heldout_loss").direction == "lower is better"


def test_load_time_is_judged_from_the_runs_own_loads():
    """Issue 14: a same-commit rerun gave load time "+ better" (5.04 -> 3.64 s) under a fixed ±10% rule."""
    # Each run loaded three times: the first in a fresh process, then twice more. Their ranges overlap.
    base = report(result("lora", load_s=5.04, loads=[3.4, 3.5]))
    rerun = report(result("lora", load_s=3.64, loads=[3.3, 3.45]))
    row = compare_reports(base, rerun).row("lora", "load_time")
    assert (row.verdict, round(row.ratio, 3)) == ("noise", 0.722)
    # where the ranges stop overlapping: base's fastest load against new's first, new's fastest against base's
    assert row.noise_band == pytest.approx([3.4 / 5.04, 3.64 / 3.3])
    # Tight loads that do not overlap: a real change, either way; the band never narrows below ±10%.
    tight = report(result("lora", load_s=2.0, loads=[2.01, 1.99]))
    slower = report(result("lora", load_s=2.6, loads=[2.61, 2.59]))
    c = compare_reports(tight, slower)
    assert c.row("lora", "load_time").verdict == "worse"
    assert compare_reports(slower, tight).row("lora", "load_time").verdict == "better"
    within_floor = report(result("lora", load_s=2.15, loads=[2.15, 2.16]))
    row = compare_reports(tight, within_floor).row("lora", "load_time")
    assert row.verdict == "noise" and row.noise_band[0] == pytest.approx(0.9)
    # An older report without its loads is judged conservatively: within a factor of 1.5 is noise.
    old, old_rerun = report(result("lora", load_s=5.04)), report(result("lora", load_s=3.64))
    assert "load_s_repeats" not in old["results"][0]
    row = compare_reports(old, old_rerun).row("lora", "load_time")
    assert row.verdict == "noise" and row.noise_band == pytest.approx([1 / 1.5, 1.5])
    assert compare_reports(old, tight).row("lora", "load_time").verdict == "better"  # 5.04 -> 2.0 s
    one_side = report(result("lora", load_s=2.8))  # 1.4 times tight's 2.0 s; only one side has its loads
    assert compare_reports(tight, one_side).row("lora", "load_time").verdict == "noise"


def test_a_metric_missing_from_one_report_is_n_a():
    c = compare_reports(report(result("lora", accuracy=0.5)), report(result("lora")))
    row = c.row("lora", "accuracy")
    assert (row.verdict, row.mark, row.base, row.new, row.ratio) == ("n/a", "?", 0.5, None, None)


def test_strategies_in_one_report_or_not_ok_are_listed_not_compared():
    base = report(result("lora"), result("qlora"), failed("full-finetune", "refused"))
    new = report(result("lora"), failed("qlora"), failed("full-finetune", "refused"), result("prefix-tuning"))
    c = compare_reports(base, new)
    assert c.strategies == ["lora"]
    assert c.only_in_new == ["prefix-tuning"] and c.only_in_base == []
    assert c.not_compared == [{"strategy": "qlora", "base": "ok", "new": "oom"},
                              {"strategy": "full-finetune", "base": "refused", "new": "refused"}]


def test_no_common_ok_strategy_is_a_user_error():
    with pytest.raises(AdaptersError, match="no strategy that ran ok in both"):
        compare_reports(report(result("lora"), failed("qlora")), report(failed("lora"), result("prefix-tuning")))


# --------------------------------------------------------------------------------------------
# Warnings


def test_comparability_warnings():
    base = report(result("lora"))
    new = report(result("lora"), gpu="NVIDIA H200", seq_len=256, gradient_checkpointing=True, dirty=True,
                 versions={"torch": "2.12.0", "peft": "0.22.0"})
    warnings = compare_reports(base, new).warnings
    text = "\n".join(warnings)
    assert "different GPU: NVIDIA H100 80GB HBM3 ×1 -> NVIDIA H200 ×1" in text
    assert "torch 2.11.0 -> 2.12.0" in text and "peft 0.21.0 -> 0.22.0" in text
    assert "transformers" not in text
    assert "seq_len 128 -> 256" in text and "gradient_checkpointing False -> True" in text
    assert "batch_size" not in text
    assert any(w.startswith("new report ran on a dirty checkout") for w in warnings)
    assert not any(w.startswith("base report") for w in warnings)
    assert len(warnings) == 4
    # GPU count, CPU-only, and batch settings are compared too.
    warnings = compare_reports(base, report(result("lora"), gpu_count=2, batch_size=4)).warnings
    assert any("×1 -> NVIDIA H100 80GB HBM3 ×2" in w for w in warnings)
    assert any("batch_size 2 -> 4" in w and "effective_batch_size 2 -> 4" in w for w in warnings)
    cpu = report(result("lora"), gpu=None, device="cpu", dtype="float32")
    warnings = compare_reports(base, cpu).warnings
    assert any("-> no GPU" in w for w in warnings)
    assert any("device cuda -> cpu" in w and "dtype bfloat16 -> float32" in w for w in warnings)


def test_warnings_are_printed_and_in_json(tmp_path, capsys):
    a = write(tmp_path, "a.json", report(result("lora")))
    b = write(tmp_path, "b.json", report(result("lora"), dirty=True))
    code, out, err = run_in_process(capsys, a, b)
    assert code == 0, err
    assert "warning: new report ran on a dirty checkout (commit 0123456789ab" in out
    code, out, _ = run_in_process(capsys, a, b, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["warnings"] == ["new report ran on a dirty checkout (commit 0123456789ab plus uncommitted changes)"]


def test_a_row_that_backed_off_is_flagged_as_a_settings_mismatch(tmp_path, capsys):
    """Issue 14, item 7: a run that halved its micro-batch after running out of memory (keeping the
    effective batch by accumulating twice) records it in its row; compare flags the mismatch."""
    base = report(result("lora", batch_size=2, gradient_accumulation_steps=1), result("qlora"))
    backed_off = report(result("lora", batch_size=1, gradient_accumulation_steps=2), result("qlora"))
    warnings = compare_reports(base, backed_off).warnings
    assert warnings == ["different settings for lora: batch_size 2 -> 1, gradient_accumulation_steps 1 -> 2 "
                        "(it ran with other settings than its report asked for: a back-off)"]
    assert compare_reports(backed_off, base).warnings[0].startswith(
        "different settings for lora: batch_size 1 -> 2, gradient_accumulation_steps 2 -> 1")
    # The same back-off in both runs compares like with like; rows that record what was asked, as
    # bench writes them, and older rows that record nothing, are as their settings say.
    assert compare_reports(backed_off, backed_off).warnings == []
    recorded = report(result("lora", batch_size=2, gradient_accumulation_steps=1), result("qlora"))
    assert compare_reports(report(result("lora"), result("qlora")), recorded).warnings == []
    # bench's quality steps run `adapters train`, which backs off too: its quality records what it ended with.
    quality_backed_off = report(result("lora"), result("qlora"))
    quality_backed_off["results"][0]["quality"].update(batch_size=1, gradient_accumulation_steps=2)
    jsonschema.validate(quality_backed_off, schema())
    assert compare_reports(report(result("lora"), result("qlora")), quality_backed_off).warnings == [
        "different settings for lora's quality run: batch_size 2 -> 1, gradient_accumulation_steps 1 -> 2 "
        "(it ran with other settings than its report asked for: a back-off)"]
    a, b = write(tmp_path, "a.json", base), write(tmp_path, "b.json", backed_off)
    code, out, err = run_in_process(capsys, a, b)
    assert code == 0, err
    assert "warning: different settings for lora: batch_size 2 -> 1, gradient_accumulation_steps 1 -> 2" in out
    code, out, _ = run_in_process(capsys, a, b, "--json")
    assert any(w.startswith("different settings for lora") for w in json.loads(out)["warnings"])


def test_an_interrupted_report_is_flagged():
    cut = report(result("lora"), failed("qlora", "cancelled"))
    cut["interrupted"] = True
    jsonschema.validate(cut, schema())
    warnings = compare_reports(report(result("lora"), result("qlora")), cut).warnings
    assert warnings == ["new report was interrupted: only what it measured before is there"]


# --------------------------------------------------------------------------------------------
# The table and --fail-on


def test_text_table_has_human_units_and_marks(tmp_path, capsys):
    a = write(tmp_path, "a.json", report(result("lora", median=0.1, spread=0.02, peak_mib=100)))
    b = write(tmp_path, "b.json", report(result("lora", median=0.125, spread=0.02, peak_mib=80)))
    code, out, err = run_in_process(capsys, a, b)
    assert code == 0 and err == ""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("strategy"))
    assert lines[header].split() == ["strategy", "metric", "base", "new", "new/base", "verdict", "direction"]
    step = next(line for line in lines if line.startswith("lora") and "step time" in line)
    assert "100.00 ms" in step and "125.00 ms" in step and "1.250" in step and "! worse" in step
    assert step.rstrip().endswith("lower is better")
    mem = next(line for line in lines if "peak memory" in line)
    assert "100.0 MiB" in mem and "80.0 MiB" in mem and "+ better" in mem
    tps = next(line for line in lines if "tokens/s" in line)
    assert "2,560 tok/s" in tps and "2,048 tok/s" in tps
    # Columns are aligned: every table row starts its "new/base" column at the same offset.
    col = lines[header].index("new/base")
    assert all(line[col - 2:col] == "  " for line in lines[header + 1:header + 6])


@pytest.mark.parametrize("new_median, spread, threshold, expected", [
    (0.110, 0.02, "5%", 1),   # 9% fewer tokens/s, beyond noise and the threshold
    (0.110, 0.02, "5", 1),    # PCT without %
    (0.110, 0.02, "15%", 0),  # beyond noise, within the threshold
    (0.110, 0.30, "5%", 0),   # beyond the threshold, within noise
    (0.090, 0.02, "5%", 0),   # faster: never a failure
])
def test_fail_on_tokens_per_s(tmp_path, capsys, new_median, spread, threshold, expected):
    a = write(tmp_path, "a.json", report(result("lora", median=0.100, spread=spread), result("qlora")))
    b = write(tmp_path, "b.json", report(result("lora", median=new_median, spread=spread), result("qlora")))
    code, out, err = run_in_process(capsys, a, b, "--fail-on", f"tokens_per_s:{threshold}")
    assert code == expected, (out, err)
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    if expected:
        assert fails == ["FAIL lora: tokens/s 9.1% worse (2,560 tok/s -> 2,327 tok/s), "
                         f"beyond --fail-on tokens_per_s:{threshold.rstrip('%')}%"]
    else:
        assert fails == []


def test_fail_on_is_repeatable_and_in_json(tmp_path, capsys):
    a = write(tmp_path, "a.json", report(result("lora", peak_mib=100)))
    b = write(tmp_path, "b.json", report(result("lora", peak_mib=110)))
    code, out, _ = run_in_process(capsys, a, b, "--fail-on", "tokens_per_s:5%", "--json")
    assert code == 0 and json.loads(out)["failures"] == []
    code, out, _ = run_in_process(capsys, a, b, "--fail-on", "tokens_per_s:5%", "--fail-on", "peak_memory:5%",
                                  "--json")
    assert code == 1
    data = json.loads(out, parse_constant=lambda name: pytest.fail(f"non-strict JSON {name}"))
    assert [(f["strategy"], f["metric"], round(f["change_pct"], 3)) for f in data["failures"]] == [
        ("lora", "peak_memory", 10.0)]
    row = next(r for r in data["rows"] if r["metric"] == "peak_memory")
    assert (row["verdict"], row["mark"], row["ratio"]) == ("worse", "!", pytest.approx(1.1))
    assert row["noise_band"] == pytest.approx([0.99, 1.01])


def test_fail_on_fails_a_strategy_that_stopped_working(tmp_path, capsys):
    a = write(tmp_path, "a.json", report(result("lora"), result("qlora")))
    b = write(tmp_path, "b.json", report(result("lora"), failed("qlora", "oom")))
    code, out, _ = run_in_process(capsys, a, b)
    assert code == 0 and "not compared: qlora (base ok, new oom)" in out
    code, out, _ = run_in_process(capsys, a, b, "--fail-on", "step_time:50%")
    assert code == 1 and "FAIL qlora: ok in base but oom in new" in out


def test_fail_on_a_metric_neither_report_has_warns(tmp_path, capsys):
    a = write(tmp_path, "a.json", report(result("lora")))
    code, out, _ = run_in_process(capsys, a, a, "--fail-on", "mfu:5%")
    assert code == 0
    assert "warning: --fail-on mfu:5% checked nothing" in out


# --------------------------------------------------------------------------------------------
# --reference


def test_reference_sentences():
    r = report(result("full-finetune", median=0.2, spread=0.1, peak_mib=400),
               result("lora", median=0.1, spread=0.2, peak_mib=200),
               result("prefix-tuning", median=0.4, spread=0.1, peak_mib=100),
               failed("qlora"))
    relatives, skipped = relative_to(r, "full-finetune")
    by_name = {x.strategy: x for x in relatives}
    assert set(by_name) == {"lora", "prefix-tuning"}
    lora = by_name["lora"]
    assert lora.speed == pytest.approx(2.0)
    assert lora.speed_error == pytest.approx(2.0 * (0.1**2 + 0.05**2) ** 0.5)  # 0.2236
    assert lora.sentence == "lora ran 2.00 ± 0.22× faster than full-finetune, using 0.50× its peak memory"
    assert by_name["prefix-tuning"].sentence == (
        "prefix-tuning ran 2.00 ± 0.14× slower than full-finetune, using 0.25× its peak memory")
    assert skipped == [{"strategy": "qlora", "status": "oom", "message": "qlora oom"}]


def test_reference_cli(tmp_path, capsys):
    path = write(tmp_path, "r.json", report(result("full-finetune", median=0.2, spread=0.1, peak_mib=400),
                                            result("lora", median=0.1, spread=0.2, peak_mib=200), failed("qlora")))
    code, out, err = run_in_process(capsys, path, "--reference", "full-finetune")
    assert code == 0, err
    assert out.splitlines() == ["lora ran 2.00 ± 0.22× faster than full-finetune, using 0.50× its peak memory",
                                "qlora: not compared (oom: qlora oom)"]
    code, out, _ = run_in_process(capsys, path, "--reference", "full-finetune", "--json")
    data = json.loads(out)
    assert data["strategies"][0]["speed"] == pytest.approx(2.0)
    assert data["strategies"][0]["memory"] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# User errors: exit 2, one line


def test_missing_file_subprocess(tmp_path):
    a = write(tmp_path, "a.json", report(result("lora")))
    done = run_cli(a, str(tmp_path / "nope.json"))
    assert_user_error(done.returncode, done.stdout, done.stderr, "nope.json", "file not found")


def test_corrupt_file_subprocess(tmp_path):
    a = write(tmp_path, "a.json", report(result("lora")))
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "results": [NaN')
    done = run_cli(a, str(bad))
    assert_user_error(done.returncode, done.stdout, done.stderr, "bad.json", "not a valid JSON report")


@pytest.mark.parametrize("field, value, where", [
    ("results", "x", "$.results"),
    ("step_s", "fast", "$.results[0].step_s"),
    ("tokens_per_s", None, "$.results[0].tokens_per_s"),
])
def test_wrong_types_subprocess(tmp_path, field, value, where):
    a = write(tmp_path, "a.json", report(result("lora")))
    broken = report(result("lora"))
    if field == "results":
        broken["results"] = value
    else:
        broken["results"][0][field] = value
    bad = write(tmp_path, "wrong.json", broken)
    done = run_cli(a, bad)
    assert_user_error(done.returncode, done.stdout, done.stderr, "wrong.json", f"invalid report at {where}: expected",
                      "Re-run `adapters bench`")
    with pytest.raises(AdaptersError, match=re.escape(f"new report: invalid report at {where}")):
        compare_reports(report(result("lora")), broken)


def test_subprocess_success_prints_strict_json(tmp_path):
    a = write(tmp_path, "a.json", report(result("lora", median=0.1, spread=0.02)))
    b = write(tmp_path, "b.json", report(result("lora", median=0.2, spread=0.02)))
    done = run_cli(a, b, "--json", "--fail-on", "step_time:10%")
    assert done.returncode == 1, done.stderr
    data = json.loads(done.stdout)
    assert [f["metric"] for f in data["failures"]] == ["step_time"]
    assert {r["metric"]: r["verdict"] for r in data["rows"]}["tokens_per_s"] == "worse"


@pytest.mark.parametrize("which", ["base", "new"])
@pytest.mark.parametrize("value, where, got", [
    ("x", "$.results", "got `str`"), ({"lora": 1}, "$.results", "got `object`"), (None, "$.results", "got `null`"),
    (5, "$.results", "got `int`"), ([1], "$.results[0]", "got `int`"), (["lora"], "$.results[0]", "got `str`"),
])
def test_results_of_a_wrong_type_name_the_path_in_process(tmp_path, capsys, which, value, where, got):
    """Issue 14, item 11: `compare` on a report whose results is a string gave an AttributeError traceback."""
    good = write(tmp_path, "good.json", report(result("lora")))
    bad = write(tmp_path, "bad.json", {**report(result("lora")), "results": value})
    args = (bad, good) if which == "base" else (good, bad)
    line = assert_user_error(*run_in_process(capsys, *args), "bad.json", f"invalid report at {where}: expected")
    assert got in line and "good.json" not in line


@pytest.mark.parametrize("case", ["future", "no-common", "reference-two", "one-no-reference", "three",
                                  "fail-on-metric", "fail-on-format", "fail-on-reference", "reference-unknown",
                                  "reference-not-ok"])
def test_user_errors_in_process(case, tmp_path, capsys):
    a = write(tmp_path, "a.json", report(result("lora"), failed("qlora")))
    b = write(tmp_path, "b.json", report(result("lora")))
    args, needles = {
        "future": ([a, write(tmp_path, "f.json", {**report(result("lora")), "schema_version": 99})],
                   ["f.json", "schema_version 99 is newer"]),
        "no-common": ([a, write(tmp_path, "o.json", report(result("prefix-tuning")))],
                      ["no strategy that ran ok in both", "base ok: lora", "new ok: prefix-tuning"]),
        "reference-two": ([a, b, "--reference", "lora"], ["--reference", "exactly one report (got 2)"]),
        "one-no-reference": ([a], ["give two reports", "(got 1)", "--reference STRATEGY"]),
        "three": ([a, b, b], ["give two reports", "(got 3)"]),
        "fail-on-metric": ([a, b, "--fail-on", "speed:5%"],
                           ["--fail-on 'speed:5%'", "unknown metric 'speed'", ", ".join(METRICS)]),
        "fail-on-format": ([a, b, "--fail-on", "tokens_per_s=5"], ["--fail-on 'tokens_per_s=5'", "METRIC:PCT",
                                                                   "tokens_per_s, step_time"]),
        "fail-on-reference": ([a, "--reference", "lora", "--fail-on", "step_time:5"], ["--fail-on needs two"]),
        "reference-unknown": ([a, "--reference", "lorra"], ["--reference 'lorra' is not in this report", "lora"]),
        "reference-not-ok": ([a, "--reference", "qlora"], ["'qlora' is oom in this report", "strategies: lora."]),
    }[case]
    assert_user_error(*run_in_process(capsys, *args), *needles)
