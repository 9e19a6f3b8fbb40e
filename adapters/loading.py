"""Loading a base model: quantized by bitsandbytes, placed by Accelerate, with its tokenizer and fingerprint.

Frozen modules that are not quantized stay in the compute dtype (bf16 on GPU): there is no fp32
upcast, which is what makes the common QLoRA recipe use more memory than bf16 LoRA.

The fingerprint identifies the base's weights by the content of its checkpoint files: a sha256 over
every weight file, so it covers every tensor and depends neither on quantization nor on the dtype a
load uses. Hashing a file is cached by its path, size and modification time. Saves from 0.1
recorded a weaker fingerprint (the config and a sample of embedding rows), still available as
`BaseModel.weak_fingerprint` to check them against.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint_files import weight_files
from .contract import QUANTIZATIONS
from .errors import AdaptersError, TokenizerFallback
from .files import cache_dir
from .models import (
    RANDOM_SHAPES,
    check_model_task,
    classification_labels,
    quiet_transformers,
    read_config,
    resolve_model,
)

# Output heads stay in the compute dtype under quantization: they are what the probe and
# classification heads train, and quantizing them saves little.
UNQUANTIZED_HEADS = ["lm_head", "score", "classifier"]


class ByteTokenizer:
    """UTF-8 bytes as token ids, for random-init models that ship no tokenizer."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    _offset = 3
    vocab_size = 256 + _offset

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + self._offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self._offset for i in ids if self._offset <= i < self.vocab_size).decode("utf-8", "replace")


@dataclass
class BaseModel:
    """A loaded base model and what the core needs to know about it."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    quantization: str
    task: str
    labels: list[str] = field(default_factory=list)
    fingerprint: str = ""  # "sha256:...", of the checkpoint's weight files (see `fingerprint`)
    weak_fingerprint: str = ""  # 0.1's fingerprint, to check saves from 0.1 against (see `weak_fingerprint`)
    # Parameters the checkpoint lacked, which the load initialised at random (a new classification
    # head), by their names in ``model``.
    new_weights: list[str] = field(default_factory=list)


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
    if task == "sequence-classification":
        if not labels:
            raise AdaptersError("task sequence-classification needs labels; pass the dataset's label names.")
        check_labels(name, labels)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    checkpoint = spec.locate()
    with quiet_transformers():
        return _load(name, checkpoint, quantization, task, labels, device, dtype)


def check_labels(name: str, labels: list[str]) -> None:
    """A checkpoint fine-tuned for classification keeps its head: the data must have as many labels."""
    trained = classification_labels(name)
    if trained is not None and trained != len(labels):
        raise AdaptersError(
            f"--model {name} is a sequence-classification checkpoint with {trained} labels, but the data has "
            f"{len(labels)} ({', '.join(map(str, labels[:5]))}{', ...' if len(labels) > 5 else ''}). "
            f"Use data with its {trained} labels, or the base model it was fine-tuned from."
        )


def _load(name, checkpoint, quantization, task, labels, device, dtype) -> BaseModel:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = read_config(checkpoint, name)  # a readable config, as one error line rather than a traceback
    # The tokenizer before the weights: one that cannot serve is refused before they load.
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    tokenizer = ByteTokenizer() if name in _random_names() else _load_tokenizer(checkpoint, name, vocab_size)
    kwargs: dict[str, Any] = dict(dtype=dtype, device_map={"": device}, trust_remote_code=False,
                                  use_safetensors=True, output_loading_info=True)
    quant_config = bnb_config(quantization, dtype)
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
    if quantization == "int8" and dtype != torch.float16:
        # int8 matmuls always cast their input to fp16; bitsandbytes logs that on every call,
        # burying the progress bar.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if task == "causal-lm":
        model, info = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    else:
        model, info = AutoModelForSequenceClassification.from_pretrained(
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
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return BaseModel(name, model, tokenizer, quantization, task, list(labels or []), fingerprint(checkpoint),
                     weak_fingerprint(model), sorted(info["missing_keys"]))


def _random_names() -> set[str]:
    return {f"random:{s}" for s in RANDOM_SHAPES}


_SAMPLE = "The capital of France is Paris; the quick brown fox jumps over the lazy dog."
MIN_DISTINCT_IDS = 4  # a real tokenizer gives the sample far more; a stand-in built from nothing gives 0 or 1
# The files a transformers tokenizer is read from; a folder with none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model.v3")


def _load_tokenizer(checkpoint: Path, name: str, vocab_size: int | None) -> Any:
    """The checkpoint's own tokenizer, checked to tokenize real text into more than a handful of ids.

    A folder without tokenizer files gets the byte-level tokenizer, with a `TokenizerFallback`
    warning (transformers would build a stand-in from the config alone, which maps every text to
    nothing or to one unknown token). Tokenizer files that fail to load, or that map real text to
    fewer than `MIN_DISTINCT_IDS` ids, are an error.
    """
    from transformers import AutoTokenizer

    if not any((checkpoint / f).exists() for f in TOKENIZER_FILES):
        if vocab_size is not None and vocab_size < ByteTokenizer.vocab_size:
            raise AdaptersError(
                f"--model {name}: the folder has no tokenizer files, and its vocabulary ({vocab_size}) is too small "
                f"for the byte-level tokenizer ({ByteTokenizer.vocab_size}). Add the model's tokenizer files."
            )
        warnings.warn(f"--model {name}: the folder has no tokenizer files, so text becomes UTF-8 bytes as token ids, "
                      "which only a model trained on them understands. Add the model's tokenizer files otherwise.",
                      TokenizerFallback, stacklevel=4)
        return ByteTokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise AdaptersError(f"--model {name}: its tokenizer files cannot be loaded "
                            f"({(str(exc).strip().splitlines() or [type(exc).__name__])[0]}). "
                            "Restore them from where the model came from.") from None
    distinct = len(set(tokenizer.encode(_SAMPLE, add_special_tokens=False)))
    if distinct < MIN_DISTINCT_IDS:
        raise AdaptersError(
            f"--model {name}: its tokenizer ({type(tokenizer).__name__}) maps real text to {distinct} distinct "
            "token id(s), so it is no real tokenizer (a placeholder, or files saved from one). Restore the "
            "model's tokenizer files (tokenizer.json or tokenizer.model)."
        )
    return tokenizer


FINGERPRINT_KIND = "sha256:"
_FINGERPRINT_CACHE = "fingerprints.json"


def fingerprint(checkpoint: str | os.PathLike[str] | torch.nn.Module) -> str:
    """The fingerprint of a base checkpoint: ``"sha256:"`` and a sha256 over its weight files.

    ``checkpoint`` is a checkpoint directory, or a transformers model loaded from one (its
    ``name_or_path``): the fingerprint is of the files, not of weights changed in memory since.
    Every tensor is covered; quantization and the dtype of a load change nothing. Each file's hash
    is cached in the adapters cache directory by its path, size and modification time, so only the
    first load of a checkpoint reads its files through.
    """
    if isinstance(checkpoint, torch.nn.Module):
        checkpoint = checkpoint.name_or_path
    directory = Path(checkpoint)
    cache = _read_fingerprint_cache()
    before = dict(cache)
    digest = hashlib.sha256()
    for path in weight_files(directory, str(directory)):
        digest.update(f"{path.name}\0{_file_sha256(path, cache)}\n".encode())
    if cache != before:
        _write_fingerprint_cache(cache)
    return FINGERPRINT_KIND + digest.hexdigest()


def _file_sha256(path: Path, cache: dict[str, Any]) -> str:
    stat = path.stat()
    key = str(path.resolve())
    known = cache.get(key)
    if isinstance(known, list) and known[:2] == [stat.st_size, stat.st_mtime_ns] and len(known) == 3:
        return str(known[2])
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    cache[key] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return digest.hexdigest()


def _read_fingerprint_cache() -> dict[str, Any]:
    try:
        cache = json.loads((cache_dir() / _FINGERPRINT_CACHE).read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_fingerprint_cache(cache: dict[str, Any]) -> None:
    """Best effort: a cache that cannot be written only means hashing again next time."""
    from .files import write_json

    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        write_json(cache_dir() / _FINGERPRINT_CACHE, {k: v for k, v in cache.items() if os.path.exists(k)})
    except OSError:
        pass


def is_weak_fingerprint(saved: str) -> bool:
    """Whether a manifest's fingerprint is 0.1's weak one (config and sampled embedding rows)."""
    return not saved.startswith(FINGERPRINT_KIND)


def base_fingerprint(base: BaseModel, saved: str) -> str:
    """``base``'s fingerprint of the kind ``saved`` (a manifest's) is: its weak one for a save from 0.1."""
    return base.weak_fingerprint if is_weak_fingerprint(saved) else base.fingerprint


def weak_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint adapters 0.1 recorded: a hash of the architecture and a sample of embedding rows.

    It misses weights outside the embeddings (decoder layers, an untied head); kept only to check
    saves from 0.1 against. Rounded to bf16, so fp32 and bf16 loads agree.
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


