"""`adapters report`: HTML with inline charts and markdown tables from benchmark reports."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from adapters.cli import main as cli_main
from adapters.errors import AdaptersError
from adapters.reports import (
    SCHEMA_DIR,
    SCHEMA_VERSION,
    OkResult,
    format_for,
    json_schema,
    load_report,
    read_report,
    render_html,
    render_markdown,
    schema,
    write_report,
)
from adapters.reports.charts import pareto
from adapters.reports.model import schema_text

SCRIPT = "<script>alert(1)</script>"
SUITE_REPORT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "cpu-2core-default-suite.json"
MiB = 2**20


def ok_result(strategy: str, tokens_per_s: float, peak_mib: float, loss_after: float | None = None,
              mfu: float | None = None, quantization: str = "none") -> dict:
    peak = int(peak_mib * MiB)
    base, train = peak // 4, peak // 16
    components = {"base_weights_quantized": base if quantization != "none" else 0,
                  "base_weights_unquantized": base if quantization == "none" else 0,
                  "trainable_parameters": train, "gradients": train, "optimizer_state": 2 * train}
    components["activations_and_temporaries"] = peak - sum(components.values())
    quality = None
    if loss_after is not None:
        quality = {"steps": 3, "status": "ok", "before": {"loss": 6.2, "perplexity": 492.7},
                   "after": {"loss": loss_after, "perplexity": 2.718 ** loss_after}, "losses": [6.2, 6.1, loss_after]}
    median = 128 / tokens_per_s
    return {
        "strategy": strategy, "name": strategy.split("@")[0], "quantization": quantization, "task": "causal-lm",
        "status": "ok", "message": None, "load_s": 1.5,
        "step_s": {"median": median, "min": median * 0.9, "max": median * 1.1, "spread": 0.2,
                   "repeat_medians": [median]},
        "tokens_per_step": 128, "tokens_per_s": tokens_per_s, "trainable_parameters": 32768,
        "total_parameters": 139584, "final_loss": 6.0,
        "memory": {"peak_bytes": peak, "source": "cuda_max_memory_allocated", "components": components,
                   "peak_rss_bytes": 400 * MiB, "reserved_bytes": peak + MiB, "nvml_used_bytes": None},
        "mfu": mfu, "energy_j_per_token": None, "quality": quality, "flags": [],
    }


def make_report(results: list[dict], model: str = "random:tiny", gpu: dict | None = None) -> dict:
    report = {
        "schema_version": 1,
        "created": "2026-11-28T04:31:02+00:00",
        "provenance": {
            "commit": "0b05c691e57b24c9d70e4289c39a432faada7f03", "dirty": True,
            "command": ["adapters", "bench", "--model", model, "--output", "r.json"], "seed": 0,
            "versions": {"adapters": "0.1.0", "torch": "2.13.0", "torch_cuda": None},
            "plugins": {"lora": "adapters 0.1.0"}, "python": "3.11.7", "os": "Linux-6.18-x86_64",
            "cpu": {"model": "AMD EPYC", "cores": 2}, "gpu": gpu,
        },
        "settings": {
            "model": model, "strategies": [r["strategy"] for r in results], "batch_size": 2,
            "gradient_accumulation_steps": 1, "effective_batch_size": 2, "seq_len": 64, "steps": 2, "warmup": 1,
            "repeats": 1, "gradient_checkpointing": False, "seed": 0, "quality_steps": 3,
            "dtype": "bfloat16" if gpu else "float32", "device": "cuda" if gpu else "cpu",
        },
        "results": results,
    }
    jsonschema.Draft202012Validator(schema()).validate(report)  # the fixtures are real reports
    return report


def cpu_report() -> dict:
    return make_report([
        ok_result("lora", 2332.0, 3.25, loss_after=6.138),
        ok_result("lora@nf4", 4554.0, 3.02, loss_after=6.136, quantization="nf4"),
        ok_result("full-finetune", 17562.0, 3.14, loss_after=6.136),
        {"strategy": "full-finetune@nf4", "status": "refused", "message": f"cannot train nf4 | {SCRIPT}"},
        ok_result("linear-probe", 3211.0, 1.56, loss_after=6.079),
        {"strategy": "prefix-tuning", "status": "oom", "message": "CUDA out of memory"},
    ])


def gpu_report() -> dict:
    gpu = {"name": "NVIDIA H100 80GB HBM3", "count": 1, "memory_bytes": 80 * 2**30}
    return make_report([
        ok_result("lora", 41000.0, 3.1 * 1024, mfu=0.21),
        ok_result("qlora", 23000.0, 1.4 * 1024, mfu=0.12, quantization="nf4"),
        ok_result("full-finetune", 52000.0, 6.9 * 1024, mfu=0.33),
    ], model="smollm2-135m", gpu=gpu)


@pytest.fixture(scope="module")
def page() -> str:
    return render_html([cpu_report()])


def svg_count(text: str) -> int:
    return len(re.findall(r"<svg[\s>]", text))


# --------------------------------------------------------------------------------------------
# HTML


def test_html_has_one_svg_per_chart_and_every_strategy(page):
    assert page.startswith("<!DOCTYPE html>")
    assert svg_count(page) == 4  # throughput, memory, speed/memory Pareto, quality/memory
    for name in ("lora", "lora@nf4", "full-finetune", "full-finetune@nf4", "linear-probe", "prefix-tuning"):
        assert f">{name}<" in page, name
    assert "refused" in page and "oom" in page and "CUDA out of memory" in page
    assert "3.25 MiB" in page and "2,332" in page and "54.9 ms ±10%" in page
    assert "0b05c691e57b24c9d70e4289c39a432faada7f03 (dirty" in page and "AMD EPYC, 2 cores" in page


def test_html_is_self_contained(page):
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "url(http" not in page and "@import" not in page
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "default-src 'none'" in page  # the Content-Security-Policy forbids fetching and scripts
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page


def test_html_escapes_untrusted_text(page):
    assert SCRIPT not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    hostile = cpu_report()
    hostile["results"][0]["strategy"] = "<b>bold</b> $x^2$ & co"
    hostile["results"][0]["flags"] = ['"><img src=x onerror=alert(1)>']
    hostile["provenance"]["command"] = ["adapters", "</code><script>x</script>"]
    hostile["settings"]["model"] = "<i>m</i>"
    text = render_html([hostile])
    assert "<b>bold</b>" not in text and "<i>m</i>" not in text and "<img" not in text and "<script" not in text
    assert "&lt;b&gt;bold&lt;/b&gt; $x^2$ &amp; co" in text  # in the table, and math text is not parsed
    assert svg_count(text) == 4


def test_no_quality_means_three_charts_and_mfu_column():
    text = render_html([gpu_report()])
    assert svg_count(text) == 3
    assert "<th>MFU</th>" in text and "21.0%" in text
    assert "GiB" in text and "NVIDIA H100 80GB HBM3" in text
    assert "<th>MFU</th>" not in render_html([make_report([ok_result("lora", 100.0, 2.0)])])


def test_two_reports_are_grouped_in_one_page():
    text = render_html([cpu_report(), gpu_report()])
    assert svg_count(text) == 4
    assert "random:tiny on cpu" in text and "smollm2-135m on NVIDIA H100 80GB HBM3" in text
    assert text.count('<table class="provenance">') == 2 and text.count('<table class="results">') == 2
    assert 'id="report-1"' in text and 'id="report-2"' in text


def test_same_model_and_machine_get_distinct_labels():
    a, b = cpu_report(), cpu_report()
    b["created"] = "2026-11-29T10:00:00+00:00"
    text = render_markdown([a, b])  # no file names given: numbered, never told apart by timestamp
    assert "## report 1: random:tiny on cpu\n" in text and "## report 2: random:tiny on cpu\n" in text
    assert "2026-11-29T10:00:00+00:00 |" in text and "## random:tiny on cpu, 2026" not in text


def test_nothing_to_chart_when_no_strategy_ran():
    report = make_report([{"strategy": "lora", "status": "failed", "message": "boom"}])
    text = render_html([report])
    assert svg_count(text) == 0 and "nothing to chart" in text and "boom" in text


@pytest.mark.parametrize("path, break_it", [
    ("$.results", lambda r: r.update(results="x")),
    ("$.results[0].step_s", lambda r: r["results"][0].update(step_s="fast")),
    ("$.results[0].step_s.median", lambda r: r["results"][0]["step_s"].update(median="fast")),
    ("$.results[0].memory", lambda r: r["results"][0].update(memory="lots")),
    ("$.results[0].tokens_per_s", lambda r: r["results"][0].update(tokens_per_s=True)),
    ("$.results[0].flags", lambda r: r["results"][0].update(flags="x")),
    ("$.results[6]", lambda r: r["results"].append("not a result")),
    ("$.results[0].status", lambda r: r["results"][0].update(status="fine")),
    ("$.results[0]", lambda r: r["results"][0].pop("step_s")),
    ("$.provenance.command", lambda r: r["provenance"].update(command="adapters bench")),
    ("$.settings.model", lambda r: r["settings"].update(model=["odd"])),
])
def test_malformed_fields_are_a_clean_error_naming_the_path(tmp_path, path, break_it):
    report = cpu_report()
    break_it(report)
    with pytest.raises(jsonschema.ValidationError):  # the shipped schema refuses it too
        jsonschema.Draft202012Validator(schema()).validate(report)
    for render in (render_html, render_markdown):
        with pytest.raises(AdaptersError, match=re.escape(f"report 1: invalid report at {path}: ")):
            render([report])
    src = tmp_path / "broken.json"
    src.write_text(json.dumps(report))
    with pytest.raises(AdaptersError) as info:
        load_report(src)
    message = str(info.value)
    assert message.startswith(f"{src}: invalid report at {path}: ") and "\n" not in message
    assert message.endswith("Re-run `adapters bench` to write a valid report.")


def test_unknown_fields_are_tolerated_and_kept_in_the_raw_data(tmp_path):
    report = cpu_report()
    report["added_later"] = {"x": 1}
    report["provenance"]["container"] = "ghcr.io/x"
    report["results"][0]["memory"]["components"]["kv_cache"] = 12
    report["results"][3]["retries"] = 2
    src = tmp_path / "r.json"
    src.write_text(json.dumps(report))
    assert load_report(src).results[0].memory.components.gradients == report["results"][0]["memory"]["components"][
        "gradients"]
    assert read_report(src) == report
    assert "lora@nf4" in render_markdown([load_report(src)])


def test_the_checked_in_default_suite_report_loads_and_renders():
    report = load_report(SUITE_REPORT)
    jsonschema.Draft202012Validator(schema()).validate(json.loads(SUITE_REPORT.read_text()))
    assert [r.strategy for r in report.results] == ["lora", "lora@nf4", "prefix-tuning", "linear-probe",
                                                    "full-finetune"]
    assert all(isinstance(r, OkResult) and r.prediction.status == "ok" for r in report.results)
    assert report.provenance.gpu is None and report.settings.device == "cpu"
    text = render_markdown([report], sources=[SUITE_REPORT.name])
    assert "| lora | ok | 4,884,480 (3.5%) | 1.14 s ±7% | 224 | 1.19 GiB |" in text
    page = render_html([report], sources=[SUITE_REPORT.name])
    assert svg_count(page) == 4 and "AMD EPYC, 2 cores" in page


def test_the_shipped_schema_is_generated_from_the_model():
    shipped = (SCHEMA_DIR / f"report-v{SCHEMA_VERSION}.schema.json").read_text()
    assert shipped == schema_text(), (
        "adapters/schemas/report-v1.schema.json differs from the model; regenerate it with "
        "`python -m adapters.reports.model > adapters/schemas/report-v1.schema.json`")
    assert schema() == json_schema()
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_pareto_front():
    points = [(1.0, 10.0), (2.0, 30.0), (3.0, 20.0), (2.0, 5.0), (4.0, 40.0)]
    assert pareto(points, y_higher_better=True) == [0, 1, 4]
    assert pareto(points, y_higher_better=False) == [0, 3]  # lower is better: least memory, lowest value


# --------------------------------------------------------------------------------------------
# Markdown


def test_markdown_tables():
    text = render_markdown([cpu_report()])
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    results = rows[: rows.index(next(r for r in rows if r.startswith("| field |")))]
    assert results[0].startswith("| strategy | status | trainable params |") and "held-out quality" in results[0]
    assert set(results[1].replace(" ", "")) <= set("|-:")
    body = results[2:]
    assert [r.split(" | ")[0][2:] for r in body] == [
        "lora", "lora@nf4", "full-finetune", "full-finetune@nf4", "linear-probe", "prefix-tuning"]
    assert all(r.count(" | ") == results[0].count(" | ") for r in body)  # the escaped pipe adds no column
    refused = body[3]
    assert "refused" in refused and "cannot train nf4 \\| &lt;script&gt;" in refused and "<script>" not in text
    assert "| lora | ok | 32,768 (23.5%) | 54.9 ms ±10% | 2,332 | 3.25 MiB |" in body[0]
    assert "loss 6.2 → 6.138" in body[0]
    assert "<details><summary>Provenance</summary>" in text and "| python | 3.11.7 |" in text
    assert "<svg" not in text


# --------------------------------------------------------------------------------------------
# Files and the command line


def test_format_for():
    assert format_for("r.html", None) == "html" and format_for("R.MD", None) == "markdown"
    assert format_for(None, None) == "markdown" and format_for("r.txt", "md") == "markdown"
    with pytest.raises(AdaptersError, match="--format pdf"):
        format_for("r.html", "pdf")
    with pytest.raises(AdaptersError, match="suffix"):
        format_for("report.txt", None)


def test_write_report_is_atomic_and_refuses_to_overwrite(tmp_path):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(make_report([ok_result("lora", 100.0, 2.0)])))
    out = tmp_path / "out" / "r.md"
    text = write_report([src], out)
    assert out.read_text() == text and "| lora | ok |" in text
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.md"]  # no temp file left behind
    with pytest.raises(AdaptersError, match="exists"):
        write_report([src], out)
    out.write_text(out.read_text().replace("| lora | ok |", "| lora | edited |"))  # an earlier rendering
    write_report([src], out, overwrite=True)
    assert out.read_text() == text
    with pytest.raises(AdaptersError, match="no reports"):
        write_report([], tmp_path / "x.md")


def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        cli_main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.mark.parametrize("name, content", [
    ("thesis.html", "<!DOCTYPE html><title>My thesis</title>"), ("notes.md", "# my notes\n"),
    ("cpu.json", None),  # the benchmark report being rendered, as --format markdown
])
def test_overwrite_replaces_only_an_earlier_rendering(tmp_path, capsys, name, content):
    """Issue 14, item 1: --overwrite replaces only what `adapters report` wrote, recognised by content."""
    src = tmp_path / "cpu.json"
    src.write_text(json.dumps(cpu_report()))
    out = tmp_path / name
    if content is not None:
        out.write_text(content)
    before = out.read_bytes()
    code, _, err = run_in_process(capsys, "report", str(src), "--output", str(out), "--format", "markdown",
                                  "--overwrite")
    assert_user_error(code, err, str(out), "is not a report written by `adapters report`", "left as it was")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == sorted({"cpu.json", name})


def test_overwrite_refuses_a_directory_and_replaces_an_earlier_page(tmp_path, capsys):
    src = tmp_path / "cpu.json"
    src.write_text(json.dumps(cpu_report()))
    folder = tmp_path / "site.html"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    code, _, err = run_in_process(capsys, "report", str(src), "--output", str(folder), "--overwrite")
    assert_user_error(code, err, str(folder), "is a directory")
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    page = tmp_path / "page.html"
    assert run_in_process(capsys, "report", str(src), "--output", str(page))[0] == 0
    page.write_text(page.read_text().replace("AMD EPYC", "an older CPU"))
    code, _, err = run_in_process(capsys, "report", str(src), "--output", str(page), "--overwrite")
    assert code == 0, err
    assert "AMD EPYC" in page.read_text() and "an older CPU" not in page.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.json", "page.html", "site.html"]  # no temp files


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def report_files(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "cpu.json", tmp_path / "gpu.json"
    a.write_text(json.dumps(cpu_report()))
    b.write_text(json.dumps(gpu_report()))
    return a, b


def test_cli_writes_html_and_refuses_to_overwrite(tmp_path, capsys, report_files):
    a, b = report_files
    out = tmp_path / "report.html"
    code, stdout, err = run_in_process(capsys, "report", str(a), str(b), "--output", str(out))
    assert code == 0, err
    assert f"report written to {out}" in stdout
    text = out.read_text()
    assert svg_count(text) == 4 and "cpu.json" in text and "gpu.json" in text
    code, _, err = run_in_process(capsys, "report", str(a), "--output", str(out))
    assert_user_error(code, err, str(out), "exists", "--overwrite")
    assert out.read_text() == text
    code, _, err = run_in_process(capsys, "report", str(a), "--output", str(out), "--overwrite")
    assert code == 0, err
    assert svg_count(out.read_text()) == 4


def test_cli_markdown_to_stdout_and_by_suffix(tmp_path, capsys, report_files):
    a, _ = report_files
    code, stdout, err = run_in_process(capsys, "report", str(a))
    assert code == 0, err
    assert stdout.startswith("# adapters benchmark report") and "| full-finetune@nf4 | refused |" in stdout
    out = tmp_path / "r.md"
    code, _, err = run_in_process(capsys, "report", str(a), "--output", str(out))
    assert code == 0 and out.read_text() == stdout
    out = tmp_path / "r.txt"
    code, _, err = run_in_process(capsys, "report", str(a), "--output", str(out), "--format", "html")
    assert code == 0 and out.read_text().startswith("<!DOCTYPE html>")


def test_cli_errors(tmp_path, capsys, report_files):
    a, _ = report_files
    code, _, err = run_in_process(capsys, "report", "--output", str(tmp_path / "r.html"))
    assert_user_error(code, err, "no reports")
    missing = tmp_path / "missing.json"
    code, _, err = run_in_process(capsys, "report", str(missing), "--output", str(tmp_path / "r.html"))
    assert_user_error(code, err, "missing.json", "not found")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"schema_version": 1, "results": [')
    code, _, err = run_in_process(capsys, "report", str(corrupt))
    assert_user_error(code, err, "corrupt.json", "not a valid JSON report")
    code, _, err = run_in_process(capsys, "report", str(a), "--format", "pdf")
    assert_user_error(code, err, "--format pdf", "Use one of html, markdown")
    code, _, err = run_in_process(capsys, "report", str(a), "--output", str(tmp_path / "r.pdf"))
    assert_user_error(code, err, "r.pdf", "--format")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.json", "cpu.json", "gpu.json"]


def test_cli_malformed_report_is_one_line_exit_2(tmp_path, capsys):
    for name, break_it, where in (("results.json", lambda r: r.update(results="x"), "$.results"),
                                  ("step.json", lambda r: r["results"][0].update(step_s="fast"),
                                   "$.results[0].step_s")):
        report = cpu_report()
        break_it(report)
        src = tmp_path / name
        src.write_text(json.dumps(report))
        for fmt in ("markdown", "html"):
            code, _, err = run_in_process(capsys, "report", str(src), "--format", fmt)
            assert_user_error(code, err, name, f"invalid report at {where}: expected", "Re-run `adapters bench`")
            assert "Traceback" not in err


def test_html_labels_runs_by_file_name_or_label(tmp_path, capsys):
    a, b = tmp_path / "before.json", tmp_path / "after.json"
    a.write_text(json.dumps(cpu_report()))
    b.write_text(json.dumps(cpu_report()))  # same model and machine: told apart by file name, not by time
    text = write_report([a, b], format="html")
    assert "before.json: random:tiny on cpu" in text and "after.json: random:tiny on cpu" in text
    assert "2026-11-28T04:31:02+00:00</" not in text.split("<figure>")[0]  # not labelled by timestamp
    charts = text[text.index("<figure>"):text.rindex("</figure>")]
    for figure in charts.split("</figure>")[:2]:  # throughput and memory: one panel per run, titled by file name
        assert ">before.json<" in figure and ">after.json<" in figure
    assert "2026-11-28" not in charts
    assert "Comparison: after.json against before.json" in text
    out = tmp_path / "r.html"
    code, _, err = run_in_process(capsys, "report", str(a), str(b), "--label", "old", "--label", "new",
                                  "--output", str(out))
    assert code == 0, err
    text = out.read_text()
    assert "old (before.json): random:tiny on cpu" in text and "Comparison: new against old" in text
    code, _, err = run_in_process(capsys, "report", str(a), str(b), "--label", "old")
    assert_user_error(code, err, "--label given 1 time(s) for 2 report(s)")
    code, _, err = run_in_process(capsys, "report", str(a), str(b), "--label", "x", "--label", "x")
    assert_user_error(code, err, "distinct")


def test_html_compares_exactly_two_reports():
    base = cpu_report()
    new = cpu_report()
    new["results"][0] = ok_result("lora", 1166.0, 3.25, loss_after=6.138)  # half the tokens/s
    new["results"][0]["load_s"] = 2.0  # 1.5 s before: beyond the old fixed ±10%, within ×1.5
    text = render_html([base, new], sources=["base.json", "new.json"])
    section = text[text.index('id="comparison"'):text.index('id="report-1"')]
    row = next(r for r in section.split("<tr>") if r.startswith('<td class="nowrap">lora</td><td>tokens/s</td>'))
    assert "2,332 tok/s" in row and "1,166 tok/s" in row and "0.500" in row and '<td class="worse">! worse</td>' in row
    assert "not compared: prefix-tuning (oom, then oom)" in section
    load = next(r for r in section.split("<tr>") if r.startswith('<td class="nowrap">lora</td><td>load time</td>'))
    assert "1.50 s" in load and "2.00 s" in load
    assert '<td class="noise">~ noise</td>' in load  # these reports recorded no load spread: judged conservatively
    assert "load time without its spread recorded: within ×1.5" in section
    assert 'id="comparison"' not in render_html([base]) and 'id="comparison"' not in render_html([base, new, new])
    nothing = make_report([{"strategy": "lora", "status": "failed", "message": "boom"}])
    assert "Not compared: the reports have no strategy that ran ok in both" in render_html([nothing, nothing])


def test_throughput_chart_draws_the_step_time_spread_as_error_bars(page):
    throughput = page[page.index("<figure>"):page.index("</figure>")]
    assert "error bar spans the tokens per second of its slowest to its fastest step" in throughput
    bars = re.search(r'<g id="LineCollection_1">(.*?)</g>', throughput, re.S)
    assert bars, "no error bars in the throughput chart"
    assert bars.group(1).count("stroke: #1a202c") == 4  # one per strategy that ran


def test_markdown_and_compare_import_neither_torch_nor_matplotlib(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(cpu_report()))
    b.write_text(json.dumps(cpu_report()))
    code = (
        "import sys\n"
        "from adapters.reports import run_compare, write_report\n"
        f"text = write_report([{str(a)!r}], None, 'markdown')\n"
        f"out, code = run_compare([{str(a)!r}, {str(b)!r}])\n"
        "assert text.startswith('# adapters') and 'noise' in out and code == 0\n"
        "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ADAPTERS_LOAD_PLUGINS": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# A real browser


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium")
def test_headless_chromium_renders_the_page(tmp_path):
    html_path = tmp_path / "report.html"
    html_path.write_text(render_html([cpu_report(), gpu_report()]))
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
         html_path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.exists(), done.stderr[-2000:]
    assert shot.stat().st_size > 10_000  # a blank page compresses to a few hundred bytes
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_every_public_name_resolves_lazily():
    import adapters.reports as reports

    assert set(reports.__all__) == set(reports._MODULE_OF)
    for name in reports.__all__:
        assert getattr(reports, name) is not None, name
