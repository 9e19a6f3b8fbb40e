"""Report formats and data readers from plugins: the guide's two examples installed and used through the
real command line, and the isolation every plugin gets (a broken hook is skipped, a built-in keeps its names)."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_docs import DOCS, block
from test_report import cpu_report, gpu_report

import adapters
import adapters.host
from adapters.data import DataError, load_dataset
from adapters.host.manager import PluginWarning
from adapters.reports import write_report

from cli_helpers import assert_user_error, run_in_process

GUIDE = {  # distribution: (module, entry point, the guide's block)
    "adapters-csv-report": ("adapters_csv_report", "csv-report", "docs-renderer-module"),
    "adapters-tsv": ("adapters_tsv", "tsv", "docs-reader-module"),
}
QUESTIONS = [("What is the capital of Peru?", "Lima."), ("What is the capital of France?", "Paris."),
             ("What is the capital of Japan?", "Tokyo."), ("What is the capital of Kenya?", "Nairobi."),
             ("What is the capital of Canada?", "Ottawa."), ("What is the capital of Chile?", "Santiago."),
             ("What is the capital of Egypt?", "Cairo."), ("What is the capital of Norway?", "Oslo.")]


def guide_module(marker: str, name: str, tmp_path: Path):
    """The guide's plugin module, exactly as printed there, imported under its own name."""
    path = tmp_path / f"{name}.py"
    path.write_text(block(DOCS.read_text(), marker))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The environment of a machine where the guide's two plugins are installed: each module as the guide
    prints it, with the distribution metadata and entry point pip leaves, on the path of `adapters`."""
    site = tmp_path_factory.mktemp("site")
    for dist, (module, entry_point, marker) in GUIDE.items():
        (site / f"{module}.py").write_text(block(DOCS.read_text(), marker))
        info = site / f"{module}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text(f"[adapters]\n{entry_point} = {module}\n")
    return {**os.environ, "ADAPTERS_LOAD_PLUGINS": ",".join(GUIDE),
            "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def adapters_command(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adapters", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def write_tsv(path: Path, rows: list[tuple[str, ...]], header: str = "prompt\tcompletion") -> Path:
    path.write_text("\n".join([header, *("\t".join(r) for r in rows)]) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# The guide's examples, installed


def test_the_guides_csv_format_renders_reports_through_the_cli(installed, tmp_path):
    (tmp_path / "cpu.json").write_text(json.dumps(cpu_report()))
    (tmp_path / "gpu.json").write_text(json.dumps(gpu_report()))
    done = adapters_command(installed, "report", "cpu.json", "gpu.json", "--output", "results.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "report written to results.csv" in done.stdout
    text = (tmp_path / "results.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert [(r["report"], r["strategy"], r["status"]) for r in rows][:3] == [
        ("cpu.json", "lora", "ok"), ("cpu.json", "lora@nf4", "ok"), ("cpu.json", "full-finetune", "ok")]
    assert len(rows) == len(cpu_report()["results"]) + len(gpu_report()["results"])
    lora = rows[0]
    assert lora["tokens_per_s"] == "2332.0" and lora["peak_mib"] == "3.25"
    refused = next(r for r in rows if r["status"] == "refused")
    assert refused["strategy"] == "full-finetune@nf4" and refused["tokens_per_s"] == ""
    assert "cannot train nf4" in refused["message"]
    assert rows[-1]["report"] == "gpu.json" and rows[-1]["tokens_per_s"] == "52000.0"

    printed = adapters_command(installed, "report", "cpu.json", "gpu.json", "--format", "csv", cwd=tmp_path)
    assert printed.returncode == 0 and printed.stdout == text
    # --overwrite replaces what the format recognises as its own, and nothing else.
    (tmp_path / "results.csv").write_text(text.replace("2332.0", "1.0"))
    again = adapters_command(installed, "report", "cpu.json", "gpu.json", "--output", "results.csv", "--overwrite",
                             cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "results.csv").read_text() == text
    (tmp_path / "budget.csv").write_text("month,cost\nJan,3\n")
    refused_write = adapters_command(installed, "report", "cpu.json", "--output", "budget.csv", "--overwrite",
                                     cwd=tmp_path)
    assert_user_error(refused_write.returncode, refused_write.stdout, refused_write.stderr, "budget.csv",
                      "is not a report written by `adapters report`")
    assert (tmp_path / "budget.csv").read_text() == "month,cost\nJan,3\n"
    unknown = adapters_command(installed, "report", "cpu.json", "--format", "xlsx", cwd=tmp_path)
    assert_user_error(unknown.returncode, unknown.stdout, unknown.stderr, "--format xlsx", "csv, html, markdown")


def test_the_guides_tsv_reader_trains_through_the_cli(installed, tmp_path):
    write_tsv(tmp_path / "questions.tsv", QUESTIONS)
    done = adapters_command(installed, "train", "--model", "random:tiny", "--data", "questions.tsv", "--max-steps",
                            "2", "--batch-size", "2", "--seq-len", "32", "--output", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 steps in" in done.stdout and "saved to run" in done.stdout
    assert json.loads((tmp_path / "run" / "adapters.json").read_text())["training"]["data"] == "questions.tsv"
    # The reader's own error, for a file it cannot read, names the file; no traceback, exit 2.
    (tmp_path / "empty.tsv").write_text("")
    empty = adapters_command(installed, "train", "--model", "random:tiny", "--data", "empty.tsv", cwd=tmp_path)
    assert_user_error(empty.returncode, empty.stdout, empty.stderr, "empty.tsv: empty; its first line names")
    (tmp_path / "questions.xml").write_text("<q/>")
    unknown = adapters_command(installed, "train", "--model", "random:tiny", "--data", "questions.xml", cwd=tmp_path)
    assert_user_error(unknown.returncode, unknown.stdout, unknown.stderr, "questions.xml", "'.xml'",
                      ".csv, .json, .jsonl, .parquet, .tsv, .txt")


def test_adapters_plugins_lists_the_guides_formats_and_their_hooks(installed):
    done = adapters_command(installed, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["csv-report"]["hooks"] == ["register_report_renderers"]
    assert rows["csv-report"]["report_formats"] == ["csv"]
    assert rows["csv-report"]["distribution"] == "adapters-csv-report"
    assert rows["tsv"]["hooks"] == ["register_data_readers"] and rows["tsv"]["data_readers"] == ["tsv"]
    assert not rows["tsv"]["builtin"] and rows["adapters.data.formats"]["builtin"]


def test_the_guides_reader_gives_rows_that_name_their_lines(register_plugin, tmp_path):
    register_plugin(guide_module("docs-reader-module", "adapters_tsv", tmp_path), name="tsv")
    rows = [*QUESTIONS[:3], ("What is the capital of Chad?", "")]
    path = write_tsv(tmp_path / "q.tsv", rows)
    with pytest.raises(DataError, match=rf'{path}:5: empty "completion"'):
        load_dataset(path, "causal-lm")
    dataset = load_dataset(write_tsv(tmp_path / "q.tsv", QUESTIONS), "causal-lm")
    assert dataset.shape == "prompt-completion" and dataset.name == str(path)
    assert sorted((e.prompt, e.completion) for e in dataset.train + dataset.heldout) == sorted(QUESTIONS)
    assert {e.source for e in dataset.train + dataset.heldout} == {f"{path}:{i}" for i in range(2, 10)}
    labelled = write_tsv(tmp_path / "l.tsv", [("good film", "pos"), ("dull film", "neg")] * 2, "text\tlabel")
    assert load_dataset(labelled, "sequence-classification").labels == ["neg", "pos"]


# --------------------------------------------------------------------------------------------
# Isolation: what strategy plugins get, report formats and data readers get too


class RaisingRenderers:
    @adapters.hookimpl
    def register_report_renderers(self, register):
        raise RuntimeError("no formats today")


class TakingBuiltinNames:
    """A renderer named like a built-in; a reader of a built-in's suffix and one of its own."""

    @adapters.hookimpl
    def register_report_renderers(self, register):
        register("html", lambda reports, sources, labels: "x", suffixes=".xhtml")
        register("tex", lambda reports, sources, labels: "\\begin{table}\n", suffixes=(".tex", ".md"))

    @adapters.hookimpl
    def register_data_readers(self, register):
        register("lines", lambda path: [(f"{path}:1", {"text": "a"})], suffixes=(".csv", ".lines"))
        register("jsonl-too", lambda path: [], suffixes=".jsonl")


@pytest.mark.filterwarnings("ignore::adapters.host.manager.PluginWarning")  # after the first
def test_a_renderer_hook_that_raises_skips_the_plugin_and_strict_makes_it_fatal(register_plugin, monkeypatch):
    register_plugin(RaisingRenderers(), name="raising_renderers", strict=False)
    with pytest.warns(PluginWarning, match="'raising_renderers'.*RuntimeError: no formats today"):
        renderers = adapters.host.get_renderers()
    assert renderers.names() == ["html", "markdown"]
    row = {r["name"]: r for r in adapters.host.list_plugins()}["raising_renderers"]
    assert row["error"] == "RuntimeError: no formats today" and row["stage"] == "registration"
    monkeypatch.setenv("ADAPTERS_STRICT_PLUGINS", "1")
    with pytest.raises(adapters.AdaptersError, match="'raising_renderers'.*failed to register its report formats"):
        adapters.host.get_renderers()


@pytest.mark.filterwarnings("ignore::adapters.host.manager.PluginWarning")  # after the first
def test_builtins_keep_their_format_names_and_suffixes(register_plugin, tmp_path):
    register_plugin(TakingBuiltinNames(), name="taking_names", strict=False)
    with pytest.warns(PluginWarning) as caught:
        renderers = adapters.host.get_renderers()
        readers = adapters.host.get_readers()
    messages = [str(w.message) for w in caught]
    for kind, name, builtin in (("report format name", "'html'", "adapters.reports.renderers"),
                                ("report format suffix", "'.md'", "adapters.reports.renderers"),
                                ("data reader suffix", "'.csv'", "adapters.data.formats"),
                                ("data reader suffix", "'.jsonl'", "adapters.data.formats")):
        assert any("'taking_names'" in m and f"registers {kind} {name}" in m and builtin in m
                   and "the built-in wins" in m for m in messages), (kind, name, messages)
    assert renderers.find("html").plugin == "adapters.reports.renderers" and renderers.for_path("r.xhtml") is None
    assert renderers.find("tex").suffixes == (".tex",) and renderers.for_path("r.md").name == "markdown"
    assert readers.for_path("d.csv").name == "csv" and readers.for_path("d.lines").name == "lines"
    assert readers.find("jsonl-too") is None  # every suffix it offered is a built-in's: it would read nothing
    rows = {r["name"]: r for r in adapters.host.list_plugins()}
    assert rows["taking_names"]["report_formats"] == ["tex"] and rows["taking_names"]["data_readers"] == ["lines"]
    assert len(rows["taking_names"]["collisions"]) == 4


def test_an_invalid_registration_skips_the_plugin_naming_the_problem(register_plugin):
    class BadSuffix:
        @adapters.hookimpl
        def register_data_readers(self, register):
            register("tsv", lambda path: [], suffixes="tsv")

    register_plugin(BadSuffix(), name="bad_suffix", strict=False)
    with pytest.warns(PluginWarning, match=r"'bad_suffix'.*invalid data reader 'tsv': suffix 'tsv' is not a "
                                           r"lowercase file suffix such as '\.csv', or \"/\" for a directory"):
        assert "tsv" not in adapters.host.get_readers().names()


def test_a_renderer_or_reader_that_fails_is_a_user_error_naming_its_plugin(register_plugin, tmp_path, capsys):
    class Failing:
        @adapters.hookimpl
        def register_report_renderers(self, register):
            register("broken", lambda reports, sources, labels: 1 / 0, suffixes=".broken")
            register("bytes", lambda reports, sources, labels: b"x")

        @adapters.hookimpl
        def register_data_readers(self, register):
            register("broken", lambda path: 1 / 0, suffixes=".broken")
            register("lists", lambda path: [["text", "a"]], suffixes=".lists")

    register_plugin(Failing(), name="failing_formats")
    (tmp_path / "cpu.json").write_text(json.dumps(cpu_report()))
    report, output = str(tmp_path / "cpu.json"), str(tmp_path / "r.broken")
    code, out, err = run_in_process(capsys, "report", report, "--output", output)
    assert_user_error(code, out, err, "--format broken: the renderer of plugin 'failing_formats' failed: "
                                      "ZeroDivisionError: division by zero")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.json"]  # nothing written
    with pytest.raises(adapters.AdaptersError, match="'failing_formats' returned bytes, not text"):
        write_report([tmp_path / "cpu.json"], format="bytes")
    for name, reader, problem in (("d.broken", "broken", "failed: ZeroDivisionError: division by zero"),
                                  ("d.lists", "lists", r"gave \['text', 'a'\] where a \(location, row\) pair")):
        (tmp_path / name).write_text("x")
        with pytest.raises(DataError, match=rf"{tmp_path / name}: the '{reader}' reader of plugin 'failing_formats' "
                                            rf"{problem}"):
            load_dataset(tmp_path / name, "causal-lm")
