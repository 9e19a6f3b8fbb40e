"""`adapters bench`: one subprocess per strategy, failures isolated, strict and valid reports."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import jsonschema
import pytest

import adapters
from adapters.bench import BenchSettings, ProfilerUnavailable, cpu_peak_tensor_bytes, run_bench, settings_from
from adapters.bench.measure import measure
from adapters.reports import read_report as load_report  # the plain JSON data, checked through the model
from adapters.reports import schema

TINY = dict(model="random:tiny", batch_size=2, seq_len=32, steps=2, warmup=1)


def measure_tiny(strategy, **changes):
    """One case of the TINY suite, measured in this process as the worker does."""
    settings = BenchSettings(**{**TINY, **changes})
    return measure(settings.spec(strategy), settings.measurement())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report.json"
    settings = BenchSettings(**TINY, strategies=["lora", "full-finetune@nf4", "linear-probe"], quality_steps=2,
                             output=str(out))
    run_bench(settings, progress=False)
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
        run_bench(BenchSettings(**TINY, strategies=["lora"], output=str(report)), progress=False)
    assert report.read_bytes() == before


def test_unknown_strategy_is_refused_before_any_work(tmp_path):
    with pytest.raises(adapters.UnknownStrategyError, match="Did you mean 'lora'"):
        run_bench(BenchSettings(**TINY, strategies=["lora", "lroa"], output=str(tmp_path / "r.json")),
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

    settings = BenchSettings(**TINY)
    case, out = tmp_path / "case.json", tmp_path / "result.json"
    write_json(case, {"spec": settings.spec("full-finetune@nf4").to_dict(),
                      "measurement": settings.measurement().to_dict()})
    assert work(str(case), str(out)) == 0
    result = json.loads(out.read_text())  # refused by resolve(spec) in the worker, before any model loads
    assert result["strategy"] == "full-finetune@nf4" and result["status"] == "refused"


def test_quantized_base_weights_are_counted_as_quantized():
    result = measure_tiny("lora@nf4")
    components = result["memory"]["components"]
    plain = measure_tiny("lora")["memory"]["components"]
    assert components["base_weights_quantized"] > 0 and plain["base_weights_quantized"] == 0
    # 4-bit linear weights take well under a quarter of their fp32 size.
    assert components["base_weights_quantized"] < 0.3 * (plain["base_weights_unquantized"]
                                                         - components["base_weights_unquantized"])


def test_suite_files_and_flags(tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text('model = "random:tiny"\nstrategies = ["lora", "linear-probe"]\nseq-len = 64\n')
    settings = settings_from(str(suite), {"seq_len": 32})
    assert settings.strategies == ["lora", "linear-probe"] and settings.seq_len == 32
    suite.write_text("stepz = 3\n")
    with pytest.raises(adapters.AdaptersError, match="stepz"):
        settings_from(str(suite), {})
    with pytest.raises(adapters.AdaptersError, match="--steps"):
        settings_from(None, {"steps": 0})


def test_default_suite_names_the_four_strategies_on_the_embedded_model():
    from pathlib import Path

    settings = settings_from(str(Path(__file__).parent.parent / "benchmarks" / "suites" / "default.toml"), {})
    assert settings.model == "smollm2-135m"
    assert {"lora", "prefix-tuning", "linear-probe", "full-finetune"} <= set(settings.strategies)


OOM_PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass
    import torch
    import adapters

    @dataclass
    class Options:
        pass

    class FakeOOM:
        name = "fake-oom"
        description = "raises CUDA out of memory in apply, as a too-large model would"
        config_class = Options
        supported_quantization = frozenset({"none"})
        supported_tasks = frozenset({"causal-lm"})

        def apply(self, model, config):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    @adapters.hookimpl
    def register_strategies(register):
        register(FakeOOM())
''')


def test_a_strategy_that_runs_out_of_memory_is_isolated(tmp_path):
    """A third-party strategy whose worker dies of OOM is recorded as oom; the next one still runs."""
    package, site = tmp_path / "pkg", tmp_path / "site"
    package.mkdir()
    (package / "adapters_fake_oom.py").write_text(OOM_PLUGIN)
    (package / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "adapters-fake-oom"
        version = "0"
        [project.entry-points.adapters]
        fake-oom = "adapters_fake_oom"
        [tool.setuptools]
        py-modules = ["adapters_fake_oom"]
    '''))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(package)], check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               ADAPTERS_LOAD_PLUGINS="adapters-fake-oom")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "adapters", "bench", "--model", "random:tiny", "--strategies",
                           "fake-oom,linear-probe", "--steps", "1", "--warmup", "0", "--seq-len", "32",
                           "--output", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = {r["strategy"]: r for r in json.loads(out.read_text())["results"]}
    assert results["fake-oom"]["status"] == "oom" and "20.00 GiB" in results["fake-oom"]["message"]
    assert results["linear-probe"]["status"] == "ok"
    assert "fake-oom" in proc.stdout and "oom" in proc.stdout


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
    assert result["declared_trainable_parameters"] == result["trainable_parameters"] - 1
    assert any("disagrees with the strategy's declared" in f for f in result["flags"])


def test_short_data_still_gives_the_asked_batch_shape(monkeypatch):
    import adapters.training as pipeline

    real = pipeline.make_batches

    def one_row(*args, **kwargs):  # data with a single sequence of seq_len tokens
        data = real(*args, **kwargs)
        return pipeline._Tensors(**{k: v[:1] for k, v in data.tensors.items()})

    monkeypatch.setattr(pipeline, "make_batches", one_row)
    result = measure_tiny("lora", batch_size=4)
    assert result["tokens_per_step"] == 4 * TINY["seq_len"]  # rows repeated, never a smaller batch
