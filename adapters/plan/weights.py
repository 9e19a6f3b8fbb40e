"""The frozen base's weights in memory, by quantization."""
from __future__ import annotations

import math

import torch

from ..contract import ModelShape, RunShape
from ..loading import UNQUANTIZED_HEADS


def base_weights(shape: ModelShape, run: RunShape, trained: int = 0) -> dict[str, int]:
    """Bytes of the frozen base: linear layers quantized (all but the output head), the rest in the
    compute dtype; ``trained`` parameters that the strategy makes trainable are left out."""
    key = (run.quantization, run.compute_bytes)
    if key not in shape.weights_cache:  # the budget search asks for the same base many times
        shape.weights_cache[key] = _base_weights(shape, run)
    quantized, plain = shape.weights_cache[key]
    return {"base_weights_quantized": quantized,
            "base_weights_unquantized": max(plain - trained * run.compute_bytes, 0)}


def _base_weights(shape: ModelShape, run: RunShape) -> tuple[int, int]:
    """(quantized, plain) bytes of the whole base."""
    model = shape.meta_model
    quantized = 0
    quantized_params: set[int] = set()
    if run.quantization != "none":
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in UNQUANTIZED_HEADS \
                    and module is not model.get_output_embeddings():
                quantized += _quantized_linear_bytes(module.weight.numel(), module.out_features, run.quantization)
                quantized_params.add(id(module.weight))
    plain = sum(p.numel() * run.compute_bytes for p in model.parameters() if id(p) not in quantized_params)
    plain += sum(b.numel() * b.element_size() for b in model.buffers())
    return quantized, plain


def _quantized_linear_bytes(numel: int, out_features: int, quantization: str) -> int:
    """A bitsandbytes-quantized weight with its constants."""
    if quantization in ("nf4", "fp4"):
        blocks = math.ceil(numel / 64)  # 4-bit blocks of 64 weights
        nested = math.ceil(blocks / 256)  # double quantization: absmax in uint8, 256 per fp32 scale
        return math.ceil(numel / 2) + blocks + nested * 4 + 256 * 4 + 16 * 4 + 4
    return numel + out_features * 4  # int8: one byte per weight and an fp32 scale per row
