"""One run session for train, bench and the kit: what bench measures is what train runs, and every engine rule
(adapters.rules) is the same whoever asks: plan, bench, train or the conformance kit."""
from __future__ import annotations

import json

import msgspec
import pytest

import adapters
from adapters import rules
from adapters.bench.settings import BenchSettings, Measurement, settings_for_run
from adapters.plan import PlanSettings, make_plans
from adapters.reports.model import OkResult

from cli_helpers import bench_case_in_process

TINY = {"model": "random:tiny", "batch_size": 2, "seq_len": 32}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_bench_train_and_the_kit_agree_on_every_engine_rule(tmp_path, checkpointing):
    """The same settings on the CPU: one compile decision, one recompute decision, one optimizer, one loss path and
    one ignore index, as the rules give them."""
    from adapters.testing.harness import Harness

    settings = {**TINY, "gradient_checkpointing": checkpointing}
    planned = make_plans(PlanSettings.of(**settings, strategies=["lora"], device="cpu"))["engine"]
    measured = bench_case_in_process(BenchSettings.of(**settings).case("lora"), Measurement(steps=1, warmup=0))
    assert isinstance(measured, OkResult), measured
    trained = adapters.train(adapters.RunSpec(**settings, max_steps=1, eval_batches=0), progress=False)
    harness = Harness(adapters.get_strategy("lora"), ["none"], ["causal-lm"], "random:tiny", 0, "cpu", tmp_path)
    kit = harness.open(harness.resolve("causal-lm", "none", gradient_checkpointing=checkpointing)).engine.to_dict()
    expected = rules.engine("cpu", "causal-lm", gradient_checkpointing=checkpointing).to_dict()
    assert planned == expected
    assert msgspec.structs.asdict(measured.engine) == expected
    assert trained.engine == expected
    assert kit == expected
    assert expected["recomputes_mlp"] is not checkpointing and expected["compiled"] is False
    assert expected["ignore_index"] == -100 and expected["loss_path"] == f"chunked({rules.DEFAULT_LOSS_CHUNK})"


def test_the_rules_compile_on_cuda_but_never_by_default_under_sharding():
    """The plan of a sharded CUDA run says what train runs: uncompiled, so its gated MLPs recompute."""
    for sharding, compiled in (("none", True), ("fsdp", False)):
        planned = make_plans(PlanSettings.of(**TINY, strategies=["lora"], device="cuda", sharding=sharding))["engine"]
        assert planned == rules.engine("cuda", "causal-lm", sharding=sharding).to_dict()
        assert planned["compiled"] is compiled and planned["recomputes_mlp"] is not compiled
    assert rules.engine("cuda", "causal-lm", compile=False).compiled is False  # as asked, whatever the default
    assert rules.engine("cpu", "sequence-classification").loss_path == "model"
    assert rules.engine("cpu", "causal-lm", loss_chunk=0).loss_path == "model"


@pytest.mark.slow
def test_bench_of_a_packed_chat_run_measures_the_tokens_train_ran(tmp_path, smollm2):
    """A chat file packed several examples a row: `bench --run` steps the run's own batches, so its tokens per step
    are the real tokens train counted for the same steps (padding left out)."""
    from pydoc_data.topics import topics

    chat = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"In Python, what is {name}?"},
                          {"role": "assistant", "content": text[:200 + 10 * (i % 7)]}]}
            for i, (name, text) in enumerate(sorted(topics.items())[:40])]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = 3
    out = tmp_path / "run"
    trained = adapters.train(adapters.RunSpec(model="smollm2-135m", data=str(chat), batch_size=2, seq_len=128,
                                              max_steps=steps, eval_batches=0, output=str(out)), progress=False)
    assert trained.status == "completed", trained.reason
    assert json.loads((out / "adapters.json").read_text())["training"]["packing"] is True
    settings = settings_for_run(str(out), {"steps": steps, "warmup": 0})
    assert settings.spec.packing is True and settings.spec.data == str(chat)
    measured = bench_case_in_process(settings.case(settings.strategies[0]), settings.measurement())
    assert isinstance(measured, OkResult), measured
    assert measured.tokens_per_step == round(trained.tokens / steps)


@pytest.mark.parametrize("checkpointed", [True, False])
def test_a_resume_resolves_its_run_once(tmp_path, monkeypatch, checkpointed):
    """`adapters train --resume RUN`: the flags are read against what the run recorded (its checkpoint's record, or
    its manifest), and the run is resolved once, whether it continues from a checkpoint or from a final save."""
    import adapters.resuming
    from adapters.resuming import resume_spec

    out = tmp_path / "run"
    spec = adapters.RunSpec(**TINY, max_steps=2, eval_batches=0, output=str(out),
                            save_every=1 if checkpointed else None)
    stop = (lambda step: step == 1) if checkpointed else None
    assert adapters.train(spec, progress=False, stop=stop).status in ("interrupted", "completed")
    calls = []
    real = adapters.resuming.resolve
    monkeypatch.setattr(adapters.resuming, "resolve", lambda *a, **k: calls.append(a) or real(*a, **k))
    resumed = adapters.train(resume_spec(out, {}, {}), progress=False)
    assert resumed.status == "completed" and len(calls) == 1
