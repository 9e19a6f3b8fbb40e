"""The training loop and the choices it makes: checkpointing, quantized gradients, failures, seeds."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import adapters
from adapters.training import enable_gradient_checkpointing

SMALL = dict(max_steps=2, batch_size=2, seq_len=32, eval_batches=1)


def _decoder_layer_calls(model: torch.nn.Module) -> list[int]:
    """Counts runs of the first decoder layer's MLP, including recomputation during backward.

    transformers checkpoints a layer's forward (not __call__), and torch stops a recomputation
    early once it has what backward needs, so module hooks miss it: wrap ``forward`` itself.
    """
    calls = [0]
    mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
    forward = mlp.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    mlp.forward = counted
    return calls


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_gradient_checkpointing_engages_and_gradients_reach_adapters(quantization):
    base = adapters.load_base_model("random:tiny", quantization=quantization)
    enable_gradient_checkpointing(base.model)
    strategy = adapters.get_strategy("lora")
    model = strategy.apply(base.model, strategy.config_class())
    calls = _decoder_layer_calls(model)
    model.train()
    ids = torch.randint(3, 200, (2, 16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # after one step LoRA's B is non-zero, so every A gets a gradient too
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    # Checkpointing really engaged: each step runs the layer again during backward.
    assert calls[0] == 4
    missing = [n for n, p in adapters.trainable_parameters(model) if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing[:5]}"


def test_without_checkpointing_layers_run_once():
    base = adapters.load_base_model("random:tiny")
    strategy = adapters.get_strategy("lora")
    model = strategy.apply(base.model, strategy.config_class())
    calls = _decoder_layer_calls(model)
    model.train()
    ids = torch.randint(3, 200, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls[0] == 1


def test_prefix_tuning_with_checkpointing_is_refused_before_loading():
    with pytest.raises(adapters.AdaptersError, match="gradient-checkpointing"):
        adapters.train(adapters.TrainSettings(model="random:tiny", strategy="prefix-tuning",
                                              gradient_checkpointing=True, **SMALL), progress=False)


def _lora_grads(model, ids):
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in adapters.trainable_parameters(model)}


def test_nf4_gradients_match_a_dequantized_reference_after_evaluation():
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel without backward the first time
    a module runs in eval mode; the loader must prevent that, or training after an evaluation gets
    wrong gradients through the frozen layers."""
    import bitsandbytes.functional as bnbf

    base = adapters.load_base_model("random:tiny", quantization="nf4")
    reference = adapters.load_base_model("random:tiny")
    with torch.no_grad():  # the reference holds exactly the values the nf4 model computes with
        for name, module in base.model.named_modules():
            if hasattr(module.weight if hasattr(module, "weight") else None, "quant_state"):
                w = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
                reference.model.get_submodule(name).weight.copy_(w)
    strategy = adapters.get_strategy("lora")
    config = strategy.config_class(dropout=0.0)
    torch.manual_seed(0)
    quantized = strategy.apply(base.model, config)
    torch.manual_seed(0)
    plain = strategy.apply(reference.model, config)
    with torch.no_grad():  # make B non-zero so that gradients depend on every layer
        for (_, p), (_, q) in zip(adapters.trainable_parameters(quantized), adapters.trainable_parameters(plain)):
            p.normal_(std=0.05)
            q.copy_(p)
    ids = torch.randint(3, 200, (2, 16))
    quantized.eval()
    with torch.no_grad():
        quantized(input_ids=ids)  # an evaluation pass, as the training loop does before training
    quantized.train()
    plain.train()
    got, want = _lora_grads(quantized, ids), _lora_grads(plain, ids)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-3, atol=2e-5, msg=name)


def test_no_fp32_upcast_of_frozen_modules():
    """Non-quantized frozen modules stay in the compute dtype: the common QLoRA recipe's fp32
    upcast is why it uses more memory than bf16 LoRA."""
    base = adapters.load_base_model("random:tiny", quantization="nf4", dtype=torch.bfloat16)
    strategy = adapters.get_strategy("qlora")
    model = strategy.apply(base.model, strategy.config_class())
    frozen_float = {n: p.dtype for n, p in model.named_parameters()
                    if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen_float, "expected embeddings and norms to stay unquantized"
    assert set(frozen_float.values()) == {torch.bfloat16}, frozen_float
    packed = [n for n, p in model.named_parameters() if p.dtype == torch.uint8]
    assert packed, "expected 4-bit packed linear weights"


@dataclass
class _Options:
    pass


class _PoisonStrategy:
    """Trains the norms, but starts them at NaN: the loss is non-finite from the first step."""

    name = "poison"
    description = "test strategy whose loss is NaN"
    config_class = _Options
    supported_quantization = frozenset({"none"})
    supported_tasks = frozenset({"causal-lm"})

    def apply(self, model, config):
        adapters.freeze(model)
        norm = model.get_submodule("model.norm")
        norm.weight.requires_grad_(True)
        with torch.no_grad():
            norm.weight.fill_(float("nan"))
        return model


class _PoisonPlugin:
    @adapters.hookimpl
    def register_strategies(self, register):
        register(_PoisonStrategy())


def test_non_finite_loss_stops_the_run_and_saves_nothing(register_plugin, tmp_path):
    register_plugin(_PoisonPlugin(), name="poison-plugin")
    out = tmp_path / "out"
    result = adapters.train(adapters.TrainSettings(model="random:tiny", strategy="poison", output=str(out), **SMALL),
                            progress=False)
    assert result.status == "failed" and "step 1" in result.reason and result.output is None
    assert result.losses[0] is None  # never a NaN as a number
    # No weights saved: only the metrics of the failing step, its loss as null.
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["loss"] is None and "loss" in line["non_finite"] and line["status"] == "failed"


def test_same_seed_same_run_other_seed_other_run():
    settings = dict(model="random:tiny", strategy="lora", **SMALL)
    a = adapters.train(adapters.TrainSettings(**settings), progress=False)
    b = adapters.train(adapters.TrainSettings(**settings), progress=False)
    c = adapters.train(adapters.TrainSettings(**settings, seed=1), progress=False)
    assert a.losses == b.losses and a.after == b.after
    assert a.losses != c.losses


def test_training_on_real_text_lowers_heldout_loss():
    """LoRA on the real SmolLM2 and the Python language reference: held-out loss goes down."""
    result = adapters.train(
        adapters.TrainSettings(model="smollm2-135m", strategy="lora", max_steps=4, batch_size=2, seq_len=64,
                               eval_batches=2, learning_rate=1e-3),
        progress=False,
    )
    assert result.after["loss"] < result.before["loss"]
    assert result.after["perplexity"] < result.before["perplexity"]
    assert result.tokens_per_s > 0


def test_linear_probe_learns_real_docstring_labels():
    """The probe on the real MiniLM beats chance on held-out standard-library docstrings."""
    result = adapters.train(
        adapters.TrainSettings(model="minilm-l6", strategy="linear-probe", max_steps=25, batch_size=16,
                               seq_len=48, eval_batches=6, learning_rate=1e-2),
        progress=False,
    )
    chance = 1 / 6
    assert result.after["accuracy"] > 1.5 * chance
    assert result.after["loss"] < result.before["loss"]


def test_linear_probe_base_builds_no_graph():
    base = adapters.load_base_model("random:tiny")
    enable_gradient_checkpointing(base.model)  # the probe must undo what would build a graph
    strategy = adapters.get_strategy("linear-probe")
    model = strategy.apply(base.model, strategy.config_class())
    seen = []
    decoder = model.get_submodule("model")
    decoder.register_forward_hook(lambda m, i, out: seen.append(out.last_hidden_state.requires_grad))
    model.train()
    ids = torch.randint(3, 200, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert seen == [False]
    assert model.get_output_embeddings().weight.grad is not None
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    """One step of 2 micro-batches x 2 accumulation updates the weights like one batch of 4."""
    from safetensors.torch import load_file

    weights = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch_size}"
        adapters.train(adapters.TrainSettings(
            model="random:tiny", strategy="full-finetune", max_steps=1, batch_size=batch_size, seq_len=32,
            gradient_accumulation_steps=accumulation, eval_batches=1, learning_rate=1e-3, output=str(out),
        ), progress=False)
        weights.append(load_file(out / "weights.safetensors"))
    initial = adapters.load_base_model("random:tiny").model.state_dict()
    for name, tensor in weights[0].items():
        assert not torch.equal(tensor, initial[name]), name
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------
# Precision: on a GPU the base is bf16; what a strategy trains is kept in float32 master weights.


@pytest.fixture
def bf16_base(monkeypatch):
    """Bases load in bf16, as they do on a GPU."""
    import adapters.training.model as pipeline

    real = pipeline.load_base_model
    monkeypatch.setattr(pipeline, "load_base_model", lambda *args, **kwargs: real(*args, **{**kwargs, "dtype": torch.bfloat16}))


def test_a_bf16_base_trains_float32_master_weights_that_keep_small_updates(bf16_base):
    from adapters.resolver import resolve
    from adapters.training import build, make_accelerator, make_batches, optimizer_step

    run = resolve(adapters.RunSpec(model="random:tiny", strategy="linear-probe", learning_rate=1e-6, **SMALL))
    built = build(run, torch.device("cpu"))
    base, model = built.base, built.model
    trainable = dict(adapters.trainable_parameters(model))
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-6, weight_decay=0.0)
    batch = {k: v[:2] for k, v in make_batches(run.dataset.train, base, 32, "train").tensors.items()}
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as Accelerate computes on a GPU
        optimizer_step(model, [batch], optimizer, make_accelerator())
    for name, p in trainable.items():
        delta = p.detach() - before[name]
        assert 0 < delta.abs().max() <= 1.01e-6, name  # AdamW's first step moves each weight by about lr
        assert (delta != 0).float().mean() > 0.99, name
        # The same update applied to bf16 weights would round nearly all of it away (all but tiny
        # weights, such as a padding token's row of zeros).
        pure = before[name].bfloat16() + delta.bfloat16()
        assert (pure == before[name].bfloat16()).float().mean() > 0.95, name


def test_a_run_on_a_bf16_base_records_its_precision_and_resumes_its_master_weights(bf16_base, tmp_path):
    from safetensors.torch import load_file

    from adapters.resuming import resume_spec

    settings = dict(model="random:tiny", strategy="full-finetune", learning_rate=1e-5, save_every=1,
                    **{**SMALL, "eval_batches": 0})
    whole = adapters.train(adapters.RunSpec(**settings, output=str(tmp_path / "whole")), progress=False)
    assert whole.status == "completed", whole.reason
    precision = {"base_dtype": "bfloat16", "trainable_dtype": ["float32"], "master_weights": ["bfloat16"],
                 "autocast": None}
    assert whole.precision == precision
    manifest = json.loads((tmp_path / "whole" / "adapters.json").read_text())
    assert manifest["training"]["precision"] == precision
    # The result is in the strategy's dtype, as adapters.load gives it back; checkpoints hold float32.
    assert {p.dtype for _, p in adapters.trainable_parameters(whole.trained)} == {torch.bfloat16}
    assert {t.dtype for t in load_file(tmp_path / "whole" / "weights.safetensors").values()} == {torch.bfloat16}
    at_step_2 = load_file(tmp_path / "whole" / "checkpoints" / "step-2" / "model" / "weights.safetensors")
    assert {t.dtype for t in at_step_2.values()} == {torch.float32}
    # A resumed run continues from the float32 weights, not from their bf16 rounding.
    cut = tmp_path / "cut"
    stopped = adapters.train(adapters.RunSpec(**settings, output=str(cut)), progress=False, stop=lambda s: s == 1)
    assert stopped.status == "interrupted"
    assert not (cut / "checkpoints" / "step-2").exists()
    resumed = adapters.train(resume_spec(cut, {}, {}), progress=False)
    assert resumed.status == "completed" and resumed.precision == precision
    got = load_file(cut / "checkpoints" / "step-2" / "model" / "weights.safetensors")
    for name, tensor in at_step_2.items():
        assert torch.equal(got[name], tensor), name
