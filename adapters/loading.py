"""Loading a base model: quantized by bitsandbytes, placed by Accelerate, with its tokenizer and fingerprint.

Frozen modules that are not quantized stay in the compute dtype (bf16 on GPU): there is no fp32
upcast, which is what makes the common QLoRA recipe use more memory than bf16 LoRA.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .contract import QUANTIZATIONS
from .errors import AdaptersError
from .models import RANDOM_SHAPES, check_model_task, quiet_transformers, resolve_model

# Output heads stay in the compute dtype under quantization: they are what the probe and
# classification heads train, and quantizing them saves little.
UNQUANTIZED_HEADS = ["lm_head", "score", "classifier"]


class ByteTokenizer:
    """UTF-8 bytes as token ids, for random-init models that ship no tokenizer."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    _offset = 3

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + self._offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self._offset for i in ids if i >= self._offset).decode("utf-8", "replace")


@dataclass
class BaseModel:
    """A loaded base model and what the core needs to know about it."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    quantization: str
    task: str
    labels: list[str] = field(default_factory=list)
    fingerprint: str = ""  # of the weights as loaded, before any training changes them


def bnb_config(quantization: str, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig for a quantization name; None for "none"."""
    if quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise AdaptersError(
            f"--quantization {quantization} needs bitsandbytes. Install it with `pip install bitsandbytes`, "
            "or use --quantization none."
        )
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_HEADS)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=UNQUANTIZED_HEADS,
    )


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp32 on the CPU, where bf16 kernels are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_base_model(
    name: str,
    quantization: str = "none",
    task: str | None = None,
    labels: list[str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> BaseModel:
    """Load a base model for ``task``, quantized with bitsandbytes and placed by Accelerate.

    Frozen modules that are not quantized stay in the compute dtype (bf16 on GPU): no fp32 upcast,
    which is what makes the common QLoRA recipe use more memory than bf16 LoRA.
    """
    if quantization not in QUANTIZATIONS:
        raise AdaptersError(f"unknown quantization {quantization!r}. Use one of: {', '.join(QUANTIZATIONS)}.")
    spec = resolve_model(name)
    task = check_model_task(spec, task)
    if task == "sequence-classification" and not labels:
        raise AdaptersError("task sequence-classification needs labels; pass the dataset's label names.")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    checkpoint = spec.locate()
    with quiet_transformers():
        return _load(name, checkpoint, quantization, task, labels, device, dtype)


def _load(name, checkpoint, quantization, task, labels, device, dtype) -> BaseModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(checkpoint)
    if getattr(config, "auto_map", None):
        raise AdaptersError(
            f"model {name!r} needs remote code (its config has auto_map); adapters never runs it. "
            "Use a model that transformers supports natively."
        )
    kwargs: dict[str, Any] = dict(dtype=dtype, device_map={"": device}, trust_remote_code=False)
    quant_config = bnb_config(quantization, dtype)
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
    if quantization == "int8" and dtype != torch.float16:
        # int8 matmuls always cast their input to fp16; bitsandbytes logs that on every call,
        # burying the progress bar.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, **kwargs,
        )
    if quant_config is not None and device.type == "cpu":
        # bitsandbytes repacks 4-bit weights for a CPU inference kernel the first time a module runs
        # in eval mode; that kernel has no backward, so training after an evaluation would get
        # silently wrong gradients through the frozen layers. Keep the trainable layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    tokenizer = _load_tokenizer(checkpoint, AutoTokenizer) if name not in _random_names() else ByteTokenizer()
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return BaseModel(name, model, tokenizer, quantization, task, list(labels or []), fingerprint(model))


def _random_names() -> set[str]:
    return {f"random:{s}" for s in RANDOM_SHAPES}


def _load_tokenizer(checkpoint: Path, auto_tokenizer: Any) -> Any:
    try:
        tokenizer = auto_tokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError):
        return ByteTokenizer()
    # A checkpoint without tokenizer files can still yield a tokenizer with an empty vocabulary
    # (transformers 5 builds one from the config), which turns any text into no tokens at all.
    if not tokenizer.encode("The capital of France is Paris.", add_special_tokens=False):
        return ByteTokenizer()
    return tokenizer


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash that identifies a base model's weights, independent of quantization and dtype.

    It hashes the architecture shape and a sample of rows of the input embeddings, which
    bitsandbytes never quantizes, rounded to bf16 so fp32 and bf16 loads agree.
    """
    config = model.config
    shape = {k: getattr(config, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    emb = model.get_input_embeddings().weight.detach()
    rows = emb[:: max(1, emb.shape[0] // 512)].to(torch.bfloat16).view(torch.int16).cpu()
    digest = hashlib.sha256(repr(sorted(shape.items())).encode())
    digest.update(rows.numpy().tobytes())
    return digest.hexdigest()[:16]


def architecture(model: torch.nn.Module) -> dict[str, Any]:
    """The config values that decide whether weights fit a model (a manifest's ``shape``)."""
    config = model.config
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


