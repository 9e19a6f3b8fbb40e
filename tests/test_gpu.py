"""GPU-only checks: skipped without CUDA. Memory and speed claims live in benchmarks/, not here."""
from __future__ import annotations

import pytest
import torch

import adapters

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_nf4_on_gpu_uses_double_quantization_and_bf16_compute():
    base = adapters.load_base_model("random:smollm2-135m", quantization="nf4")
    config = base.model.config.quantization_config
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert base.model.get_input_embeddings().weight.dtype == torch.bfloat16  # no fp32 upcast
    assert base.model.get_input_embeddings().weight.device.type == "cuda"


def test_qlora_trains_on_gpu_in_bf16_mixed_precision(tmp_path):
    result = adapters.train(adapters.TrainSettings(model="random:smollm2-135m", strategy="qlora", max_steps=3,
                                                   batch_size=2, seq_len=64, eval_batches=1,
                                                   output=str(tmp_path / "q")), progress=False)
    assert result.quantization == "nf4" and all(map(lambda x: x == x, result.losses))
    restored = adapters.load(tmp_path / "q")
    assert next(restored.model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_a_resumed_run_on_gpu_matches_an_uninterrupted_one(strategy, tmp_path):
    """The CUDA path of checkpoints and resume: bf16 autocast, CUDA random states, nf4 kernels."""
    from adapters.resuming import resume_spec

    spec = dict(model="random:smollm2-135m", strategy=strategy, max_steps=4, batch_size=2, seq_len=64,
                eval_batches=1, save_every=2, gradient_accumulation_steps=2)
    whole = adapters.train(adapters.RunSpec(**spec, output=str(tmp_path / "whole")), progress=False)
    stopped = adapters.train(adapters.RunSpec(**spec, output=str(tmp_path / "cut")), progress=False,
                             stop=lambda step: step == 2)
    assert stopped.status == "interrupted"
    resumed = adapters.train(resume_spec(tmp_path / "cut", {}, {}), progress=False)
    expected = dict(adapters.trainable_parameters(whole.trained))
    got = dict(adapters.trainable_parameters(resumed.trained))
    diff = max(float((expected[n].float() - got[n].float()).abs().max()) for n in expected)
    assert diff <= 1e-3, diff  # kernels may differ in the last bits between runs on a GPU
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-3)
