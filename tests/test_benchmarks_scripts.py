"""The plain-stack baseline (benchmarks/baseline/plain_stack.py) measures what benchmarks/side_by_side.py says it
does: the same tokens as adapters bench, and the HF QLoRA recipe with its checkpointing really on."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import adapters
from adapters.models import resolve_model
from adapters.resolver import resolve
from adapters.runspec import RunSpec
from adapters.training import make_batches

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def plain_stack():
    spec = importlib.util.spec_from_file_location("plain_stack", ROOT / "benchmarks" / "baseline" / "plain_stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["random:tiny", "smollm2-135m"])
def test_the_plain_stack_trains_on_the_tokens_adapters_bench_trains_on(plain_stack, model, request):
    base = request.getfixturevalue("smollm2") if model == "smollm2-135m" else adapters.load_base_model(model)
    run = resolve(RunSpec(model=model, batch_size=3, seq_len=64))
    bench_rows = make_batches(run.dataset.train, base, 64, "train").tensors["input_ids"][:3]  # bench's batch
    ids = plain_stack.tokens(model, resolve_model(model).locate(), 3, 64)
    assert ids.shape == (3, 64) and torch.equal(ids, bench_rows)


def test_the_hf_qlora_recipe_recomputes_its_layers_in_backward(plain_stack):
    """prepare_model_for_kbit_training turns checkpointing on; in train mode, as the baseline runs it, each decoder
    layer's forward runs again in backward (left in eval mode, as a hand-written loop may, it would not)."""
    model = plain_stack.load(resolve_model("random:tiny").locate(), "qlora", cuda=False, seed=0)
    assert model.training
    calls = []
    layer = model.get_base_model().model.layers[0]
    layer.mlp.register_forward_hook(lambda *_: calls.append(1))  # inside the layer: the recomputation runs it too
    ids = torch.randint(3, 200, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2  # the forward, and its recomputation in backward
    lora = layer.self_attn.q_proj
    assert type(lora.base_layer).__name__ == "Linear4bit" and lora.lora_A["default"].weight.grad is not None
