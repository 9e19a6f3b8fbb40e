"""The training engine: no host synchronisation in a step, AdamW per device, --compile.

The runs are real (random:tiny, CPU, fp32) through the public API and the command line. Host reads are counted by
wrapping every Python-level way to read a tensor's values on the host (``.item()``, ``bool()``, ``float()``, ...)
during real steps of the real loop. Compiling here uses torch's ``aot_eager`` backend: the same regional
compilation (dynamo and AOT autograd over each decoder layer) without inductor's C++ code generation, which takes
a minute per run on a busy 2-core machine; inductor itself is measured by benchmarks/compile.py on SmolLM2.
"""
from __future__ import annotations

import json
import traceback
import warnings

import pytest
import torch

import adapters
from adapters import engine
from adapters.resolver import resolve
from adapters.runspec import RunSpec

from cli_helpers import bench_case_in_process, run_in_process

TINY = dict(model="random:tiny", batch_size=2, seq_len=32, eval_batches=1)
TINY_ARGS = ["--model", "random:tiny", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1"]
# Every Python-level read of a tensor's values by the host: on a GPU, each waits for the device.
HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy", "nonzero")
# transformers' own check in the model's forward (masking_utils: is the batch packed? padded?), once a forward.
TRANSFORMERS_MASK = "transformers/masking_utils.py"


class HostReads:
    """Counts the host reads (`HOST_READS`) made while ``phase`` is set, with where each came from."""

    def __init__(self, monkeypatch) -> None:
        self.phase: int | None = None
        self.seen: list[tuple[int, str, str]] = []  # (phase, what, where: the caller's file and line)
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))

    def _counting(self, name, original):
        def read(tensor, *args, **kwargs):
            if self.phase is not None:
                stack = traceback.extract_stack()[:-1]
                # The data loader's collate reads CPU rows before they move to the device: input, not the step.
                if not any("torch/utils/data/" in frame.filename for frame in stack):
                    self.seen.append((self.phase, name, f"{stack[-1].filename}:{stack[-1].lineno}"))
            return original(tensor, *args, **kwargs)
        return read

    def of(self, *phases: int) -> list[tuple[str, str]]:
        return [(what, where) for phase, what, where in self.seen if phase in phases]


@pytest.mark.parametrize(("strategy", "data"), [("lora", None), ("full-finetune", "builtin:instructions")],
                         ids=["lora-documents", "full-finetune-packed-instructions"])
def test_a_step_of_the_loop_reads_nothing_back_from_the_device(strategy, data, monkeypatch):
    """Steps 2 to 4 of 5 (no logging step among them; gradient clipping on; two micro-batches a step) read no
    tensor on the host; the logging step at the end does (the counter sees the loop's reads)."""
    reads = HostReads(monkeypatch)
    forwards = []

    def stop(step: int) -> bool:
        reads.phase = step  # the reads after step N's stop() belong to step N + 1
        return False

    spec = adapters.RunSpec(**TINY, strategy=strategy, max_steps=5, log_every=100, gradient_accumulation_steps=2,
                            max_grad_norm=1.0, compile=False, **({"data": data} if data else {}))
    with torch.nn.modules.module.register_module_forward_hook(
            lambda module, args, out: forwards.append(1) if type(module).__name__.endswith("ForCausalLM") else None):
        result = adapters.train(spec, progress=False, stop=stop)
    assert result.status == "completed" and len(result.losses) == 5
    steps = reads.of(1, 2, 3)
    ours = [(what, where) for what, where in steps if TRANSFORMERS_MASK not in where]
    assert ours == [], f"host reads in a step: {ours}"
    # transformers' forward checks its mask once (see engine's docstring); nothing else in the step reads.
    assert len(steps) - len(ours) <= 3 * 2, steps
    assert len(forwards) >= 3 * 2
    assert "tolist" in {what for what, _ in reads.of(5)}, reads.of(5)  # the logging step reads its losses


def test_adamw_is_fused_on_the_cpu_and_updates_as_plain_adamw():
    torch.manual_seed(0)
    shapes = [(5, 3), (7,)]
    fused_params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    fused = engine.make_optimizer(fused_params, lr=1e-2, weight_decay=0.1, device="cpu")
    plain = torch.optim.AdamW(plain_params, lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for params, optimizer in ((fused_params, fused), (plain_params, plain)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # A device without a fused kernel gets foreach.
    meta = engine.make_optimizer([torch.nn.Parameter(torch.zeros(2, device="meta"))], 1e-3, device="meta")
    assert meta.defaults["foreach"] is True and not meta.defaults.get("fused")


def test_compile_finds_the_decoder_layers_through_peft_and_undoes_cleanly():
    from adapters.training import build

    model = build(resolve(RunSpec(**TINY, strategy="lora")), torch.device("cpu")).model
    layers = engine.decoder_layers(model)
    assert layers is model.get_base_model().model.layers
    names = [n for n, _ in model.named_parameters()]
    assert engine.compile_layers(model) == len(layers) == model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert [n for n, _ in model.named_parameters()] == names  # saved and checkpointed under the same names
    engine.uncompile_layers(model)
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert engine.decoder_layers(torch.nn.Linear(2, 2)) is None and engine.compile_layers(torch.nn.Linear(2, 2)) == 0


def test_compile_trains_to_the_same_losses_records_it_and_gives_back_a_plain_model(monkeypatch, tmp_path):
    monkeypatch.setattr(engine, "BACKEND", "aot_eager")
    # Full fine-tuning: every layer's input needs a gradient, so one graph serves all layers (LoRA's first differs).
    compiled = adapters.train(adapters.RunSpec(**TINY, strategy="full-finetune", max_steps=3, compile=True,
                                               output=str(tmp_path / "run")), progress=False)
    assert compiled.compiled == {"on": True, "layers": 2, "error": None}
    manifest = json.loads((tmp_path / "run" / "adapters.json").read_text())
    assert manifest["training"]["compiled"] == compiled.compiled
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in compiled.trained.modules())
    plain = adapters.train(adapters.RunSpec(**TINY, strategy="full-finetune", max_steps=3, compile=False),
                           progress=False)
    assert plain.compiled == {"on": False, "layers": 0, "error": None}
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-5)


def test_the_compile_flags_reach_the_run(monkeypatch, capsys):
    from adapters.errors import AdaptersError

    seen = []

    def train(spec, progress=True):
        seen.append(spec.compile)
        raise AdaptersError("stopped before loading")

    monkeypatch.setattr("adapters.training.train", train)
    for flags in (["--compile"], ["--no-compile"], []):
        code, _, err = run_in_process(capsys, "train", *TINY_ARGS, *flags)
        assert code == 2 and "stopped before loading" in err
    assert seen == [True, False, None]


def test_bench_with_compile_records_compile_time_apart_from_step_time(monkeypatch):
    from adapters.bench.settings import BenchSettings, Measurement

    monkeypatch.setattr(engine, "BACKEND", "eager")  # dynamo's capture alone: what is timed is the same
    settings = BenchSettings.of(model="random:tiny", batch_size=2, seq_len=32, compile=True)
    # No warm-up asked: the step that compiles is still run untimed.
    result = bench_case_in_process(settings.case("full-finetune"), Measurement(steps=2, warmup=0))
    assert result.status == "ok", result
    assert result.compiled_layers == 2 and result.compile_s >= 0  # None when nothing compiled
    assert result.steps_run == 1 + 2
    plain = bench_case_in_process(BenchSettings.of(model="random:tiny", batch_size=2, seq_len=32, compile=False)
                                  .case("lora"), Measurement(steps=1, warmup=0))
    assert plain.compiled_layers == 0 and plain.compile_s is None and plain.steps_run == 1


def test_a_compiler_that_fails_falls_back_with_one_warning_and_the_run_goes_on(monkeypatch):
    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(engine, "BACKEND", broken)
    with pytest.warns(engine.CompileFallback, match=r"no C\+\+ compiler found.*--no-compile") as caught:
        result = adapters.train(adapters.RunSpec(**TINY, max_steps=2, compile=True), progress=False)
    assert len([w for w in caught if w.category is engine.CompileFallback]) == 1
    assert result.status == "completed"
    assert result.compiled["on"] is False and "no C++ compiler found" in result.compiled["error"]
    plain = adapters.train(adapters.RunSpec(**TINY, max_steps=2, compile=False), progress=False)
    assert result.losses == pytest.approx(plain.losses, rel=1e-6)


def test_packed_rows_count_their_tokens_without_the_closing_padding():
    from adapters.batches import packed, real_tokens
    from adapters.rules import IGNORE_INDEX

    rows = [([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]), ([1, 2, 3], [IGNORE_INDEX, 2, 3]),
            ([4, 4, 4, 4, 4, 4], [IGNORE_INDEX] * 3 + [4, 4, 4])]
    batch = packed(rows, 8, pad=0)
    assert int(real_tokens(batch)) == 4 + 3 + 6  # 13 real tokens in 2 rows of 8
    batch = packed([([1, 2, 3, 4], [IGNORE_INDEX, 2, 3, 4])] * 2, 4, pad=0)  # rows filled to the end: no padding
    assert int(real_tokens(batch)) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_micro_step_on_the_gpu_does_not_synchronise():
    """`torch.cuda.set_sync_debug_mode` around a whole optimizer step of two micro-batches, with clipping and the
    schedule, after a first step: no synchronising CUDA call but transformers' own mask check, once a forward."""
    from transformers import get_scheduler

    from adapters.training import build, make_accelerator, make_batches, optimizer_step

    run = resolve(RunSpec(model="random:smollm2-135m", strategy="lora", batch_size=2, seq_len=64))
    accelerator = make_accelerator()
    built = build(run, accelerator.device)
    base, model = built.base, built.model
    rows = make_batches(run.dataset.train, base, 64, "train").tensors
    batch = {k: v[:2].to(accelerator.device) for k, v in rows.items()}
    optimizer = engine.make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-4, 0.0,
                                      accelerator.device)
    assert optimizer.defaults["fused"] is True
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    optimizer_step(model, [batch], optimizer, accelerator, scheduler, 1.0)  # lazy state, handles, allocations
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss, norm = optimizer_step(model, [batch, batch], optimizer, accelerator, scheduler, 1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch's own notice that the mode is a prototype is not a synchronisation (seen on an H200, torch 2.11)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)]
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in syncs if TRANSFORMERS_MASK not in w.filename]
    assert ours == [], ours
    assert len(syncs) <= 2, [f"{w.filename}:{w.lineno}" for w in syncs]
    assert loss.device.type == "cuda" and norm.device.type == "cuda" and torch.isfinite(loss)


def test_gated_mlps_recompute_their_activation_with_the_same_gradients_and_less_memory():
    """Each gated MLP keeps gate(x) and up(x) for backward and recomputes act(gate) * up there: the same loss and
    gradients, and one [tokens x intermediate] tensor a layer less at the peak, as the plan counts it."""
    import copy

    from adapters.bench import cpu_peak_tensor_bytes
    from adapters.engine import recompute_gated_mlps

    plain = adapters.load_base_model("random:tiny").model
    lean = copy.deepcopy(plain)
    assert recompute_gated_mlps(lean) == plain.config.num_hidden_layers
    assert recompute_gated_mlps(lean) == 0  # once only
    ids = torch.randint(0, plain.config.vocab_size, (4, 128))

    def step(model):
        model(input_ids=ids, labels=ids).loss.backward()

    results = {}
    for name, model in (("plain", plain), ("lean", lean)):
        step(model)
        model.zero_grad(set_to_none=True)
        peak = cpu_peak_tensor_bytes(lambda m=model: step(m))
        results[name] = (peak, {n: p.grad.clone() for n, p in model.named_parameters()})
    for n, grad in results["plain"][1].items():
        torch.testing.assert_close(results["lean"][1][n], grad, rtol=1e-5, atol=1e-7, msg=n)
    saved = plain.config.num_hidden_layers * ids.numel() * plain.config.intermediate_size * 4
    assert results["plain"][0] - results["lean"][0] >= 0.9 * saved
