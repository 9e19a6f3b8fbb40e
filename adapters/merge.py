"""Merging a saved run into its base: a plain transformers checkpoint, checked against the adapter model.

`merge_run` is the pipeline behind ``adapters merge RUN --output DIR``:

1. refuse before anything loads: a strategy that does not declare `adapters.Merges` (with its
   ``merge_refusal``, the reason, when it gives one), an output that is the run or the base, an
   output that exists (without ``overwrite``; then only adapters' own directory is replaced), and
   saved weights holding NaN or infinity;
2. load the base in float32, in the quantization the run trained on, and dequantize it: QLoRA merges
   into a dequantized copy of its nf4 base, exactly the weights its adapter was trained against (the
   base on disk is only read). Float32 whatever the output's dtype, so that small updates are added
   before they are rounded, not rounded away. (bitsandbytes' int8 matmul also rounds activations,
   so an int8 run's own outputs differ from its merge by about 1%; nf4 and fp4 match it closely);
3. restore the run onto it (`adapters.load`, strict, with the fingerprint check), take its logits on
   held-out text, let the strategy fold its weights in (``Merges.merge``), and check that the merged
   model gives the same logits (at the float32 tolerance);
4. save the plain model in the chosen dtype (safetensors, ``save_pretrained``) with the tokenizer's
   files, into a temp directory; reload it there with plain transformers, in float32, and compare its
   logits with the adapter model's. Beyond the dtype's tolerance (`TOLERANCES`) nothing is kept; within
   it the merge record (``adapters.json``: the source run, strategy, base, fingerprint, dtype,
   tolerance and measured difference) is written and the directory renamed into place.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .contract import Merges, Strategy
from .errors import AdaptersError

# --dtype names -> dtypes.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The largest difference allowed between the merged checkpoint's logits and the adapter model's, relative
# to the logits' scale (their largest magnitude, at least 1), by the checkpoint's dtype. Both are computed
# in float32. At float32 only the order of the sums differs (W x + B A x against (W + B A) x): SmolLM2-135M
# measures 2e-6, so 1e-4 leaves room for deeper models and still catches any lost update. At fp16 and bf16
# each stored weight is also rounded, to 11 and 8 significant bits (a relative 2**-11 and 2**-8 at most),
# and a forward pass adds those errors up over its layers: SmolLM2-135M measures 0.09-0.16% (fp16) and
# 0.7-0.9% (bf16) after LoRA, QLoRA and full fine-tuning, so 1% and 5% (five to six times that) hold for
# other models without letting a lost head or embedding pass. The merge itself is checked at the float32
# tolerance first, in memory, before any rounding (`MergeResult.merge_difference`).
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
HELDOUT_ROWS, HELDOUT_TOKENS = 2, 64  # the held-out text the logits are compared on
RECORD = "adapters.json"  # the merge record, beside the checkpoint's own files
KIND = "merged-checkpoint"


@dataclasses.dataclass
class MergeResult:
    """What ``adapters merge`` wrote, and how closely the merged checkpoint reproduces the adapter model."""

    output: Path
    run: str
    strategy: str
    base_model: str
    task: str
    dtype: str  # the checkpoint's dtype: "bfloat16", "float16" or "float32"
    quantization: str  # the run's; anything but "none" means the merge went into a dequantized copy
    tolerance: float  # relative to the logits' scale
    max_difference: float  # the largest difference of the reloaded checkpoint's logits from the adapter model's
    scale: float  # the largest magnitude of the adapter model's logits, at least 1
    merge_difference: float  # the same for the merged model in memory, in float32, before it is saved
    files: list[str]

    @property
    def dequantized(self) -> bool:
        return self.quantization != "none"

    @property
    def relative_difference(self) -> float:
        return self.max_difference / self.scale

    def summary(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {**data, "output": str(self.output), "dequantized": self.dequantized,
                "relative_difference": self.relative_difference}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``bf16``/``fp16``/``fp32`` (or a torch dtype, or its name) as a dtype; None stays None (the base's)."""
    if name is None or isinstance(name, torch.dtype):
        if name is not None and name not in TOLERANCES:
            raise AdaptersError(f"--dtype {name}: use one of {', '.join(DTYPES)}.")
        return name
    by_name = {**DTYPES, **{str(d).removeprefix("torch."): d for d in DTYPES.values()}}
    if name not in by_name:
        raise AdaptersError(f"--dtype {name!r}: use one of {', '.join(DTYPES)}.")
    return by_name[name]


def refuse_unmergeable(strategy: Strategy, run: Path) -> None:
    """A strategy without `Merges` cannot be merged: say so, with its ``merge_refusal`` when it gives one."""
    if isinstance(strategy, Merges):
        return
    reason = getattr(strategy, "merge_refusal", None)
    why = f": {reason}" if reason else ""
    raise AdaptersError(f"{run}: strategy {strategy.name!r} does not declare merging (adapters.Merges){why}. "
                        "Use the run with its adapter instead (adapters.load, adapters generate).")


def merge_run(run: str | Path, output: str | Path, *, dtype: str | torch.dtype | None = None,
              overwrite: bool = False, device: torch.device | str | None = None) -> MergeResult:
    """Merge the run saved in ``run`` into its base and save a plain transformers checkpoint to ``output``.

    ``dtype`` is the checkpoint's (``"bf16"``, ``"fp16"``, ``"fp32"``; default: the base's own, as its
    config.json records it). The checkpoint loads with ``AutoModelForCausalLM.from_pretrained(output)``
    (or ``...ForSequenceClassification``), with no PEFT and no adapters code. Raises `AdaptersError`
    for anything in the way (see the module's docstring), and when the reloaded checkpoint's logits
    differ from the adapter model's by more than the dtype's tolerance, keeping nothing.
    """
    from .files import replace_dir, temp_sibling
    from .host import get_registry
    from .manifest import read_manifest
    from .store import check_output_dir, load

    run = Path(run)
    manifest = read_manifest(run)
    strategy = get_registry().get(manifest.strategy)
    refuse_unmergeable(strategy, run)
    wanted = parse_dtype(dtype)
    output = check_output_dir(output, overwrite)
    _refuse_inputs_as_output(output, run, manifest)
    check_finite(run, manifest.files)

    base = _dequantized_base(manifest, device)
    out_dtype = wanted or stored_dtype(Path(base.model.name_or_path))
    plain_class = type(base.model)
    loaded = load(run, base=base)
    batch = heldout_batch(base.tokenizer, manifest.task, loaded.model.device)
    expected = logits(loaded.model, batch)
    scale = max(1.0, float(expected.abs().max()))
    merged = _merged(strategy, loaded, plain_class)
    folded = float((logits(merged, batch) - expected).abs().max())
    if not folded <= TOLERANCES[torch.float32] * scale:  # also true for NaN
        raise AdaptersError(f"strategy {strategy.name!r}: its merge changes the logits on held-out text by "
                            f"{folded:.3g}, beyond {TOLERANCES[torch.float32]:g} of their scale {scale:.3g}, so the "
                            "merged model is not the trained one; nothing was written. Report it to its plugin.")
    name, tolerance = str(out_dtype).removeprefix("torch."), TOLERANCES[out_dtype]
    tmp = temp_sibling(output, "tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        _save(merged, base.tokenizer, tmp, out_dtype)
        del merged, loaded
        reloaded = logits(reload(tmp, manifest.task, expected.device), batch)
        difference = float((reloaded - expected).abs().max())
        if not difference <= tolerance * scale:
            raise AdaptersError(
                f"{run}: the merged checkpoint, reloaded with transformers, gives logits {difference:.3g} away from "
                f"the adapter model's on held-out text, beyond the {name} tolerance ({tolerance:g} of their scale "
                f"{scale:.3g}); nothing was written. Merge with --dtype fp32, or report it to the strategy's plugin.")
        result = MergeResult(output, str(run), strategy.name, manifest.base_model, manifest.task, name,
                             manifest.quantization, tolerance, difference, scale, folded,
                             sorted([*(p.name for p in tmp.iterdir()), RECORD]))
        _write_record(tmp, result, manifest)
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _refuse_inputs_as_output(output: Path, run: Path, manifest: Any) -> None:
    """Replacing the run, or the local base, with the merged checkpoint would lose them: refuse."""
    inputs = {"the run being merged": run.resolve()}
    base_path = (manifest.local or {}).get("base_path")
    if base_path:
        inputs["the run's base"] = Path(base_path).resolve()
    target = output.resolve()
    for what, path in inputs.items():
        if target == path or target in path.parents:
            raise AdaptersError(f"--output {output}: holds {what} ({path}), which the merged checkpoint would "
                                "replace. Choose a new directory.")


def check_finite(run: Path, files: list[str]) -> None:
    """Refuse a run whose saved weights hold NaN or infinity, reading one tensor at a time (no pickles)."""
    from safetensors import SafetensorError, safe_open

    for name in files:
        if not name.endswith(".safetensors"):
            continue
        path = run / name
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is no dict
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        raise AdaptersError(f"{path}: weight {key} holds NaN or infinite values, so there is "
                                            "nothing sound to merge. Train and save the run again.")
        except (OSError, SafetensorError) as exc:
            raise AdaptersError(f"{path}: not a readable safetensors file ({exc}). Save the run again.") from None


def _dequantized_base(manifest: Any, device: torch.device | str | None) -> Any:
    """The run's base in float32, in its quantization, then dequantized: the weights the adapter trained against."""
    from .loading import load_base_model
    from .models import quiet_transformers
    from .store import _saved_base

    base = load_base_model(_saved_base(manifest), manifest.quantization, manifest.task, manifest.labels or None,
                           device, dtype=torch.float32)
    if manifest.quantization != "none":
        with quiet_transformers():  # "The modules are dequantized in torch.float32 ..."
            base.model = base.model.dequantize()
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):  # left set, and PEFT's IA3 then refuses to merge
            if getattr(base.model, flag, False):
                setattr(base.model, flag, False)
    return base


def _merged(strategy: Strategy, loaded: Any, plain_class: type) -> torch.nn.Module:
    """The strategy's merge, checked to leave a plain model of the base's class with no wrapper inside."""
    loaded.model.eval()
    with torch.no_grad():
        merged = strategy.merge(loaded.model, loaded.config)
    if type(merged) is not plain_class:
        raise AdaptersError(f"strategy {strategy.name!r}: merge returned a {type(merged).__name__}, not the base's "
                            f"{plain_class.__name__}. Fix the plugin's merge to return the base model.")
    foreign = sorted({type(m).__module__.split(".")[0] for m in merged.modules()} - {"torch", "transformers"})
    if foreign:
        raise AdaptersError(f"strategy {strategy.name!r}: its merged model still holds modules from "
                            f"{', '.join(foreign)}, which plain transformers cannot load. Fix the plugin's merge "
                            "to unload them.")
    return merged


def _save(model: torch.nn.Module, tokenizer: Any, directory: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` in ``dtype`` (safetensors), and the tokenizer's files when it has any."""
    from .models import quiet_transformers
    from .tensorfiles import first_non_finite

    model.to(dtype)
    bad = first_non_finite(model.named_parameters())
    if bad:
        raise AdaptersError(f"merged weight {bad} does not fit in {str(dtype).removeprefix('torch.')} (it overflows "
                            "to infinity). Merge with --dtype bf16 or fp32.")
    model.config.use_cache = True  # training turned it off; a checkpoint is for generating
    with quiet_transformers():  # no "Writing model shards" bar
        model.save_pretrained(directory)
    if hasattr(tokenizer, "save_pretrained"):  # random:<shape> bases have a byte-level tokenizer, and no files
        tokenizer.save_pretrained(directory)


def reload(directory: Path, task: str, device: torch.device) -> torch.nn.Module:
    """The checkpoint in ``directory`` loaded as a user would, with plain transformers, in float32.

    A weight the checkpoint lacks (a head left out of the save) is an error, not a fresh initialisation.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .models import quiet_transformers

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with quiet_transformers():
        model, info = auto.from_pretrained(directory, dtype=torch.float32, device_map={"": device},
                                           trust_remote_code=False, use_safetensors=True, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise AdaptersError(f"the merged checkpoint lacks {len(missing)} weight(s) that transformers then "
                            f"initialises at random ({', '.join(missing[:3])}); nothing was written. Report it to "
                            "the strategy's plugin.")
    return model


def stored_dtype(checkpoint: Path) -> torch.dtype:
    """The dtype a checkpoint's config.json records (``dtype``, or ``torch_dtype`` before transformers 5);
    float32 when it records none or one a merge cannot write."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return next((d for d in TOLERANCES if str(d).removeprefix("torch.") == name), torch.float32)


def heldout_batch(tokenizer: Any, task: str, device: torch.device) -> dict[str, torch.Tensor]:
    """`HELDOUT_ROWS` rows of `HELDOUT_TOKENS` tokens of the built-in held-out text, no padding.

    The held-out topics of the Python reference (``adapters.data.corpora``), for either task: a
    classification head reads the same text as a language model does.
    """
    from .data.corpora import python_reference

    ids: list[int] = []
    need = HELDOUT_ROWS * HELDOUT_TOKENS
    for example in python_reference().heldout:
        ids += tokenizer.encode(example.text, add_special_tokens=False)
        if len(ids) >= need:
            break
    input_ids = torch.tensor(ids[:need], dtype=torch.long, device=device).view(HELDOUT_ROWS, HELDOUT_TOKENS)
    batch = {"input_ids": input_ids}
    if task != "causal-lm":
        batch["attention_mask"] = torch.ones_like(input_ids)
    return batch


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**batch).logits.float()


def _write_record(directory: Path, result: MergeResult, manifest: Any) -> None:
    from .files import write_json
    from .store import package_versions

    write_json(directory / RECORD, {
        "kind": KIND,
        "merged_from": {"run": result.run, "strategy": result.strategy, "config": manifest.config,
                        "base_model": manifest.base_model, "fingerprint": manifest.fingerprint,
                        "quantization": manifest.quantization, "task": manifest.task, "labels": manifest.labels,
                        # The run's settings: its data for adapters eval, its "chat_template" for generate.
                        "training": manifest.training},
        "dtype": result.dtype,
        # A quantized run merges into its base dequantized to float32, then stored in `dtype`.
        "dequantized": result.dequantized,
        # The reloaded checkpoint's logits against the adapter model's, both in float32, on held-out text.
        "check": {"text": f"{HELDOUT_ROWS} x {HELDOUT_TOKENS} tokens of held-out python-reference text",
                  "scale": result.scale, "tolerance": result.tolerance, "max_difference": result.max_difference,
                  "relative_difference": result.relative_difference,
                  "merge_difference": result.merge_difference},
        "files": result.files,
        "versions": package_versions(),
    })


def read_record(directory: str | Path) -> dict[str, Any] | None:
    """The merge record of a merged checkpoint, or None when ``directory`` holds none."""
    try:
        data = json.loads((Path(directory) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == KIND else None
