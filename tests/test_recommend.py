"""`adapters recommend`: what does not fit is excluded without a run, the rest are measured within the budget and
ranked by compare's noise rules; a second call agrees; errors come before any work.

Two recommend calls, one through the library and one through the command line, each in this process (bench's
cases measured in-process: the same measurement, without a fresh interpreter's seconds of imports), on random:tiny with the
built-in real text. At 2 x 32 with a 2 MiB limit the planner fits LoRA and the linear probe, and full fine-tuning's
least peak is above the limit."""
from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec
import pytest
from cli_helpers import assert_user_error, bench_case_in_process, run_in_process

from adapters.recommend import RecommendSettings, recommend
from adapters.recommend.ranking import Measured, compared, dominates, front, rank
from adapters.recommend.render import text
from adapters.reports.load import as_report

ARGS = {"model": "random:tiny", "seq_len": 32, "batch_size": 2, "memory_limit": "2MiB"}
CANDIDATES = ["lora", "linear-probe", "full-finetune"]
BUDGET_MINUTES = 1.25


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One recommend call in this process, with how long it took."""
    import adapters.bench.runner as runner

    patch = pytest.MonkeyPatch()
    patch.setattr(runner, "run_case", bench_case_in_process)
    out = tmp_path_factory.mktemp("recommend") / "first"
    began = time.monotonic()
    try:
        result = recommend(RecommendSettings.of(**ARGS, candidates=CANDIDATES, budget_minutes=BUDGET_MINUTES,
                                                output=str(out)))
    finally:
        patch.undo()
    return result, time.monotonic() - began, out


def by_name(result):
    return {c["name"]: c for c in result["candidates"]}


def test_what_does_not_fit_is_excluded_without_a_run(first):
    result, _, out = first
    full = by_name(result)["full-finetune"]
    assert full["status"] == "excluded"
    assert "--memory-limit 2MiB is too small for full-finetune" in full["reason"]
    assert full["peak_bytes"] is None and full["tokens_per_s"] is None
    bench = json.loads((out / "bench.json").read_text())
    assert [r["strategy"] for r in bench["results"]] == ["lora", "linear-probe"]  # full fine-tuning never ran


def test_the_rest_are_measured_within_the_budget_and_ranked(first):
    result, took, out = first
    assert took <= 60 * BUDGET_MINUTES + 5 and result["within_budget"]
    assert result["recommended"] in ("lora", "linear-probe")
    ranked = result["candidates"]
    assert ranked[0]["name"] == result["recommended"] and ranked[0]["status"] == "recommended"
    assert result["learning_steps"] == 16 and result["learning_tokens"] == 16 * 2 * 32
    for c in ranked[:2]:
        assert c["planned_peak_bytes"] <= 0.9 * 2 * 2**20  # fitted under the limit less the planner's headroom
        assert c["peak_bytes"] > 0 and c["tokens_per_s"] > 0 and c["loss_after"] < c["loss_before"]
        low, high = c["tokens_per_s_range"]
        assert low <= c["tokens_per_s"] <= high
        assert c["reason"]  # why it won, or why it lost
    assert result["recommended"] in result["front"]
    # Every file is a strict JSON document compare and report read, and the HTML report holds the chart.
    for name in ("bench.json", "recommend.json"):
        json.loads((out / name).read_text(), parse_constant=lambda c: pytest.fail(f"{name} has {c}"))
    as_report(json.loads((out / "bench.json").read_text()))
    page = (out / "report.html").read_text()
    assert "Recommendation" in page and "<svg" in page and result["recommended"] in page
    shown = text(result)
    assert f"Recommended: {result['recommended']}." in shown and "- full-finetune (excluded)" in shown


def test_a_second_call_from_the_command_line_agrees(first, tmp_path, capsys, monkeypatch):
    import adapters.bench.runner as runner

    monkeypatch.setattr(runner, "run_case", bench_case_in_process)
    result, _, _ = first
    out = tmp_path / "second"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    began = time.monotonic()
    code, stdout, err = run_in_process(capsys, "recommend", *args, "--candidates", ",".join(CANDIDATES),
                                       "--budget-minutes", str(BUDGET_MINUTES), "--output", str(out), "--json")
    assert code == 0, err
    assert time.monotonic() - began <= 60 * BUDGET_MINUTES + 5
    second = json.loads(stdout)
    assert second == json.loads((out / "recommend.json").read_text())
    assert by_name(second)["full-finetune"]["status"] == "excluded"
    same = second["recommended"] == result["recommended"]
    assert same or set(second["within_noise"]) | set(result["within_noise"]) >= {"lora", "linear-probe"}, (
        second["why"], result["why"])


def test_the_rules_are_compares(first):
    """The ranking's verdicts follow compare's noise bands: a copy within them is a tie, beyond them it loses."""
    _, _, out = first
    results = {r.strategy: r for r in as_report(json.loads((out / "bench.json").read_text())).results}
    a = Measured("a", results["lora"], results["lora"])

    def changed(name, loss=1.0, speed_factor=1.0, peak=1.0):
        s = msgspec.structs.replace(a.speed, tokens_per_s=a.speed.tokens_per_s * speed_factor,
                                    memory=msgspec.structs.replace(a.speed.memory,
                                                                   peak_bytes=int(a.speed.memory.peak_bytes * peak)))
        q = msgspec.structs.replace(a.learning.quality, after={**a.learning.quality.after,
                                                               "loss": a.loss * loss})
        return Measured(name, s, msgspec.structs.replace(a.learning, quality=q))

    twin = changed("twin", loss=1.005)
    assert [compared(a, twin, m) for m in ("heldout_loss", "tokens_per_s", "peak_memory")] == [0, 0, 0]
    worse = changed("worse", loss=1.05)
    assert compared(a, worse, "heldout_loss") == 1 and dominates(a, worse) and not dominates(worse, a)
    small = changed("small", loss=1.05, peak=0.5)  # higher loss, half the memory: on the front
    assert [c.name for c in front([a, worse, small])] == ["a", "small"]
    ranking = rank([worse, small, a])
    assert ranking.recommended == "a" and ranking.within_noise == []
    assert ranking.lost["worse"].startswith("dominated by a: +5.0% held-out loss")
    assert ranking.lost["small"].startswith("higher held-out loss than a (+5.0% held-out loss), though it has 0.50x")
    tie = rank([a, twin])
    assert set(tie.within_noise) == {"a", "twin"} and "within noise of each other" in tie.why


def test_user_errors_come_before_any_work(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [(["--candidates", "lora,lorra"], "lorra"), (["--budget-minutes", "0"], "--budget-minutes"),
             (["--output", str(taken)], "is not an empty directory"), (["--candidates", ","], "--candidates")]
    for extra, needle in cases:
        began = time.monotonic()
        code, out, err = run_in_process(capsys, "recommend", "--model", "random:tiny", *extra)
        assert_user_error(code, out, err, needle)
        assert time.monotonic() - began < 20  # nothing was measured
    assert (taken / "keep.txt").read_text() == "mine" and sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    assert not any(Path.cwd().glob("recommend-random-tiny-*"))


def test_ctrl_c_keeps_what_was_measured(tmp_path):
    """A real SIGINT to a recommend process while it measures its second candidate: exit 130, and the first
    candidate's measurements, the recommendation from them and the report are all written."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "adapters", "recommend", "--model", "random:tiny", "--seq-len", "32",
                             "--batch-size", "2", "--candidates", "lora,linear-probe", "--budget-tokens", "64",
                             "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ADAPTERS_LOAD_PLUGINS": ""})
    for line in proc.stderr:
        if line.startswith("measuring linear-probe"):
            time.sleep(1)
            proc.send_signal(signal.SIGINT)
            break
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout
    result = json.loads((out / "recommend.json").read_text())
    assert result["interrupted"] and result["recommended"] == "lora"
    assert by_name(result)["linear-probe"]["status"] == "not measured"
    assert "interrupted" in by_name(result)["linear-probe"]["reason"]
    assert [r["strategy"] for r in json.loads((out / "bench.json").read_text())["results"]] == ["lora",
                                                                                               "linear-probe"]
    assert (out / "report.html").exists() and "Recommended: lora" in stdout
