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
