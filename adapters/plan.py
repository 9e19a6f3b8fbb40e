"""Predict a training step's peak memory from a model's config alone, before any run.

The pipeline mirrors a real step: ``model_shape`` builds the model's skeleton on the meta device
(no weights, no allocation, seconds even for 70B); each strategy's ``estimate_memory`` hook says
what it trains and what its own modules keep for backward (`StrategyMemory`); `estimate` adds the
base's part and takes the largest of the step's phases:

- the forward: every activation saved so far, plus the last layer's working tensors;
- the loss backward: every activation saved for backward, plus the ``[tokens x vocab]`` log-softmax
  and its two gradient buffers;
- a layer's backward (with its recomputation under gradient checkpointing), and for full
  fine-tuning the end of backward, when every gradient exists;
- the optimizer step: every gradient plus AdamW's temporaries.

The activation model follows the tensors PyTorch saves in two layer families: Llama-style decoders
(RMSNorm, rotary attention with GQA through SDPA, a gated MLP) and BERT-style encoders (LayerNorm,
attention with dropout, GELU). It was checked tensor by tensor against
``torch.autograd.graph.saved_tensors_hooks`` on SmolLM2 and MiniLM, and its CPU totals against
profiler peaks (tests/test_plan.py). Architectures it does not model get no estimate, never a guess.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .contract import GRADIENT_FLOWS, EstimatesMemory, LinearShape, ModelShape, RunShape, StrategyMemory  # noqa: F401
from .errors import AdaptersError

GiB = 2**30
MiB = 2**20


# Memory that is not tensors the step creates. The CPU peak is read from the profiler's tensor
# allocations, which the model accounts for exactly (measured: within 1 MiB on SmolLM2). On CUDA,
# cuBLAS keeps its workspace in the caching allocator (32 MiB on Hopper with the default config).
RUNTIME_OVERHEAD = {"cpu": 0, "cuda": 32 * MiB}

# The layer families whose activations `estimate` models, by the modules a layer must have.
_FAMILY_PARTS = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"),
}
# Linear layers that read one tensor, and those whose input the base already keeps for backward.
_SHARED_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
                  "up_proj": "mlp_in", "query": "attn_in", "key": "attn_in", "value": "attn_in"}
_INPUT_KEPT = {"self_attn.o_proj"}  # SDPA keeps its output, which o_proj reads


COMPONENTS = {
    "base_weights_quantized": "frozen weights stored quantized, with their scales and double-quant constants",
    "base_weights_unquantized": "frozen weights kept in the compute dtype: embeddings, norms, output head",
    "trainable_parameters": "the weights the strategy trains",
    "optimizer_state": "AdamW's two moments",
    "gradients": "gradients alive at the peak",
    "activations": "tensors saved for backward, alive at the peak",
    "logits_and_loss": "the [tokens x vocab] log-softmax and its gradient buffers",
    "optimizer_step": "AdamW's temporaries during its update",
    "runtime_overhead": "memory outside the step's tensors (cuBLAS workspace)",
}
# The components a bench measurement reports as they are; it counts every gradient and calls the
# rest of its peak "activations_and_temporaries".
STATIC_COMPONENTS = ("base_weights_quantized", "base_weights_unquantized", "trainable_parameters",
                     "optimizer_state")


@dataclass
class Plan:
    """The predicted peak of one strategy's training step, by component."""

    strategy: str  # as asked, e.g. "lora@nf4"
    name: str
    quantization: str
    status: str  # "ok", "no estimate", "refused"
    message: str | None = None
    components: dict[str, int] = field(default_factory=dict)  # sums to peak_bytes
    peak_bytes: int | None = None
    peak_phase: str | None = None  # "forward", "loss backward", "layer backward", "end of backward", "optimizer step"
    trainable_parameters: int | None = None
    budget_bytes: int | None = None
    fits: bool | None = None
    max_batch_size: int | None = None  # at the asked sequence length
    max_seq_len: int | None = None  # at the asked batch size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def measured_convention(self) -> dict[str, int]:
        """The prediction split the way a bench measurement is: every gradient counted, the rest
        of the peak beyond the static parts as activations and temporaries."""
        c = self.components
        static = {k: c[k] for k in STATIC_COMPONENTS}
        static["gradients"] = c["trainable_parameters"]  # a gradient per trainable weight, in its dtype
        static["activations_and_temporaries"] = self.peak_bytes - sum(static.values())
        return static


# ---------------------------------------------------------------------------------------- load


def model_shape(name: str, task: str | None = None, device: str = "cuda", num_labels: int = 2) -> ModelShape:
    """The shape of a model from its config, on the meta device: nothing is downloaded or allocated."""
    from .models import _quiet_transformers, check_model_task, model_config, resolve_model

    spec = resolve_model(name)
    task = check_model_task(spec, task)
    config = model_config(name)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"), _quiet_transformers():
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            config.num_labels = num_labels
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    c = model.config
    heads = getattr(c, "num_attention_heads", 0)
    head_dim = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else 0)
    layer = _first_layer(model)
    linears = _layer_linears(layer) if layer is not None else []
    family = _family(layer) if layer is not None else None
    return ModelShape(
        name=name, config=c, task=task, meta_model=model, family=family, hidden_size=c.hidden_size,
        num_layers=getattr(c, "num_hidden_layers", 0), num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate_size=getattr(c, "intermediate_size", 0), vocab_size=c.vocab_size,
        num_labels=num_labels, attention=getattr(c, "_attn_implementation", None) or "sdpa",
        layer_linears=linears,
    )


def _first_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    for name, module in model.named_modules():
        if re.search(r"\.layers?\.0$", name):
            return module
    return None


def _family(layer: torch.nn.Module) -> str | None:
    names = {n for n, _ in layer.named_modules()}
    for family, parts in _FAMILY_PARTS.items():
        if all(p in names for p in parts):
            norms = [m for n, m in layer.named_modules() if n.endswith(("layernorm", "LayerNorm"))]
            kind = "RMSNorm" if family == "llama" else "LayerNorm"
            if len(norms) == 2 and all(kind in type(m).__name__ for m in norms):
                return family
    return None


def _layer_linears(layer: torch.nn.Module) -> list[LinearShape]:
    out = []
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            out.append(LinearShape(leaf, module.in_features, module.out_features,
                                   _SHARED_INPUTS.get(leaf, name), name in _INPUT_KEPT))
    return out


# ---------------------------------------------------------------------------------------- parts


def _quantized_linear_bytes(numel: int, out_features: int, quantization: str) -> int:
    """A bitsandbytes-quantized weight with its constants."""
    if quantization in ("nf4", "fp4"):
        blocks = math.ceil(numel / 64)  # 4-bit blocks of 64 weights
        nested = math.ceil(blocks / 256)  # double quantization: absmax in uint8, 256 per fp32 scale
        return math.ceil(numel / 2) + blocks + nested * 4 + 256 * 4 + 16 * 4 + 4
    return numel + out_features * 4  # int8: one byte per weight and an fp32 scale per row


def base_weights(shape: ModelShape, run: RunShape, trained: int = 0) -> dict[str, int]:
    """Bytes of the frozen base: linear layers quantized (all but the output head), the rest in the
    compute dtype; ``trained`` parameters that the strategy makes trainable are left out."""
    key = (run.quantization, run.compute_bytes)
    if key not in shape.weights_cache:
        shape.weights_cache[key] = _base_weights(shape, run)
    quantized, plain = shape.weights_cache[key]
    return {"base_weights_quantized": quantized,
            "base_weights_unquantized": max(plain - trained * run.compute_bytes, 0)}


def _base_weights(shape: ModelShape, run: RunShape) -> tuple[int, int]:
    from .models import _HEADS

    quantized = 0
    quantized_params: set[int] = set()
    if run.quantization != "none":
        for name, module in shape.meta_model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in _HEADS \
                    and module is not shape.meta_model.get_output_embeddings():
                quantized += _quantized_linear_bytes(module.weight.numel(), module.out_features, run.quantization)
                quantized_params.add(id(module.weight))
    plain = sum(p.numel() * run.compute_bytes for p in shape.meta_model.parameters()
                if id(p) not in quantized_params)
    plain += sum(b.numel() * b.element_size() for b in shape.meta_model.buffers())
    return quantized, plain


def layer_activations(shape: ModelShape, run: RunShape, flow: str, extra_tokens: int = 0) -> int:
    """Bytes one layer of the base saves for backward, under a gradient flow."""
    if flow == "head":
        return 0
    return (_llama_layer if shape.family == "llama" else _bert_layer)(shape, run, flow, extra_tokens)


def _llama_layer(shape: ModelShape, run: RunShape, flow: str, extra_tokens: int) -> int:
    n, e = run.tokens, run.compute_bytes
    h, i = shape.hidden_size, shape.intermediate_size
    b, t = run.batch_size, run.seq_len
    s = t + extra_tokens  # key/value length
    masked = extra_tokens > 0 or run.task == "sequence-classification"  # padding masks in classification
    norms = 2 * (n * h * 4 + n * 4)  # RMSNorm keeps its fp32 input and the inverse RMS
    q_and_out = 2 * n * shape.q_width * e
    kv_heads = shape.num_heads if masked or shape.attention == "eager" else shape.num_kv_heads
    kv = 2 * b * s * kv_heads * shape.head_dim * e  # GQA runs natively in SDPA unless a mask is given
    if shape.attention == "eager":
        attention = q_and_out + kv + b * shape.num_heads * t * s * (4 + e)  # fp32 softmax and its cast
    else:
        attention = q_and_out + kv + b * shape.num_heads * t * 4  # the log-sum-exp
        if extra_tokens:
            attention += b * t * s * (4 if run.device == "cpu" else e)  # the prefix's explicit mask
    mlp = 3 * n * i * e  # gate (for SiLU's backward), SiLU's output and up (for the product's)
    saved = norms + attention + mlp
    if flow == "weights":  # linear inputs for weight gradients, and the norms' normalized input
        saved += 2 * n * h * e + 2 * n * h * e + n * i * e
    return saved


def _bert_attention_math(shape: ModelShape, run: RunShape) -> bool:
    """Whether SDPA takes its math path (scores materialized): on the CPU with attention dropout."""
    dropout = getattr(shape.config, "attention_probs_dropout_prob", 0.0) or 0.0
    return shape.attention == "eager" or (run.device == "cpu" and dropout > 0)


def _bert_layer(shape: ModelShape, run: RunShape, flow: str, extra_tokens: int) -> int:
    n, e, m = run.tokens, run.compute_bytes, run.dropout_mask_bytes
    h, i = shape.hidden_size, shape.intermediate_size
    scores = run.batch_size * shape.num_heads * run.seq_len * (run.seq_len + extra_tokens)
    if _bert_attention_math(shape, run):  # q, k, v; softmax output, dropout mask and output
        attention = 3 * n * h * e + scores * (2 * e + m)
    else:  # q, k, v, output and the log-sum-exp
        attention = 4 * n * h * e + run.batch_size * shape.num_heads * run.seq_len * 4
    dropout = m if (getattr(shape.config, "hidden_dropout_prob", 0.0) or 0.0) > 0 else 0
    # Each residual block: its dropout's mask, then LayerNorm's fp32 input with mean and inverse std.
    blocks = 2 * (n * h * dropout + n * h * 4 + 2 * n * 4)
    saved = attention + blocks + n * i * e  # GELU keeps its input
    if flow == "weights":  # inputs of query/key/value, the attention output, intermediate and output
        saved += 3 * n * h * e + n * i * e
    return saved


def _outside_layers(shape: ModelShape, run: RunShape, flow: str) -> int:
    """Saved outside the layers, before the loss: the final norm, the head, BERT's embeddings and pooler."""
    n, h, e = run.tokens, shape.hidden_size, run.compute_bytes
    if shape.family == "bert":
        saved = 3 * run.batch_size * h * 4  # the pooler's and the classifier's small inputs
        if flow == "weights":  # the embeddings' LayerNorm and dropout, and the pooler's view of the last layer
            saved += n * h * 4 + 2 * n * 4 + n * h * run.dropout_mask_bytes + n * h * e
        return saved
    if flow == "head":
        return n * h * e  # the trainable head's input
    saved = n * h * 4 + n * 4  # the final RMSNorm
    if flow == "weights":
        saved += n * h * e * 2  # its normalized input and the head's input
    return saved


def _transients(shape: ModelShape, run: RunShape) -> tuple[int, int]:
    """(forward, backward) working sets of one layer: what exists only while it runs."""
    n, e, h, i = run.tokens, run.compute_bytes, shape.hidden_size, shape.intermediate_size
    if shape.family == "llama":  # the MLP: gate or its gradient, up, SiLU's output and the product
        return 3 * n * i * e + 3 * n * h * e, 3 * n * i * e
    scores = run.batch_size * shape.num_heads * run.seq_len * run.seq_len * e
    attention = 3 * scores if _bert_attention_math(shape, run) else 4 * n * h * e
    return max(attention, 2 * n * i * e) + 2 * n * h * e, max(attention, 2 * n * i * e)


def _loss(shape: ModelShape, run: RunShape) -> tuple[int, int]:
    """(saved, transient) bytes of the loss: causal-lm's fp32 log-softmax over the vocabulary is
    saved; its backward briefly holds two more buffers of that size."""
    if run.task != "causal-lm":
        return run.batch_size * shape.num_labels * 4, run.batch_size * shape.num_labels * 8
    logits = run.tokens * shape.vocab_size * 4
    return logits, 2 * logits


# ---------------------------------------------------------------------------------------- estimate


def strategy_memory(strategy, shape: ModelShape, config: Any, run: RunShape) -> StrategyMemory | None:
    """The strategy's own estimate, or None when it has no ``estimate_memory`` hook."""
    if not isinstance(strategy, EstimatesMemory):
        return None
    part = strategy.estimate_memory(shape, config, run)
    if part is not None and part.gradient_flow not in GRADIENT_FLOWS:
        raise AdaptersError(
            f"strategy {strategy.name!r}: estimate_memory returned gradient_flow={part.gradient_flow!r}; "
            f"use one of {', '.join(GRADIENT_FLOWS)}."
        )
    return part


def peak(shape: ModelShape, run: RunShape, part: StrategyMemory) -> tuple[dict[str, int], str]:
    """The components at the step's predicted peak (they sum to it), and which phase it is in."""
    weights = base_weights(shape, run, part.base_parameters_trained)
    static = {**weights, "trainable_parameters": part.trainable_bytes,
              "optimizer_state": 2 * part.trainable_bytes if part.optimizer_state_bytes is None
              else part.optimizer_state_bytes}
    flow = part.gradient_flow
    layer = layer_activations(shape, run, flow, part.extra_attention_tokens)
    layer += part.layer_activation_bytes if flow != "head" else 0
    outside = _outside_layers(shape, run, flow)
    loss_saved, loss_transient = _loss(shape, run)
    checkpointed = run.gradient_checkpointing and flow != "head"
    kept = shape.num_layers * (run.tokens * shape.hidden_size * run.compute_bytes if checkpointed else layer)
    if flow == "inputs" and not checkpointed and shape.family == "llama":  # the embeddings' output needs
        kept -= run.tokens * (shape.hidden_size + 1) * 4  # no gradient: layer 0's first norm keeps nothing
    forward, working = _transients(shape, run)
    phases: dict[str, dict[str, int]] = {
        "forward": {"activations": kept + forward},
        "loss backward": {"activations": kept + outside, "logits_and_loss": loss_saved + loss_transient},
    }
    if flow != "head":
        # A layer's backward: its saved tensors (recomputed under checkpointing) plus the gradients
        # in flight through it.
        phases["layer backward"] = {"activations": kept + outside + (layer if checkpointed else 0) + working}
        if flow == "weights":  # the first layer's backward, with every other gradient already made
            first = (kept if checkpointed else 0) + layer + working
            phases["end of backward"] = {"gradients": part.trainable_bytes, "activations": first}
    if run.device == "cuda":  # foreach AdamW: one temporary the size of every trainable tensor at once
        optimizer_step = part.trainable_bytes
    else:  # the CPU's per-tensor AdamW: sqrt and a division of the largest tensor at once
        optimizer_step = 2 * part.largest_trainable_tensor_bytes
    phases["optimizer step"] = {"gradients": part.trainable_bytes, "optimizer_step": optimizer_step}
    phase = max(phases, key=lambda p: sum(phases[p].values()))
    components = {k: 0 for k in COMPONENTS}
    components.update(static)
    components.update(phases[phase])
    components["runtime_overhead"] = RUNTIME_OVERHEAD[run.device]
    return components, phase


def estimate(shape: ModelShape, strategy, config: Any, run: RunShape, spec: str | None = None) -> Plan:
    """The plan for one strategy: its components and peak, or "no estimate" with the reason."""
    name = strategy.name
    spec = spec or (name if run.quantization == "none" else f"{name}@{run.quantization}")
    if shape.family is None:
        return Plan(spec, name, run.quantization, "no estimate",
                    f"the activations of {shape.config.model_type!r} models are not modelled")
    part = strategy_memory(strategy, shape, config, run)
    if part is None:
        return Plan(spec, name, run.quantization, "no estimate", "the strategy provides no estimate_memory hook")
    components, phase = peak(shape, run, part)
    return Plan(spec, name, run.quantization, "ok", components=components, peak_bytes=sum(components.values()),
                peak_phase=phase, trainable_parameters=part.trainable_parameters)


# ---------------------------------------------------------------------------------------- budget


def largest_that_fits(fits, upper: int) -> int | None:
    """The largest n in [1, upper] with fits(n), for a monotone fits; None if not even 1 fits.

    Doubles from 1 to the first n that does not fit, then bisects."""
    if not fits(1):
        return None
    lo, hi = 1, 2
    while hi <= upper and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, upper + 1)
    while hi - lo > 1:  # fits(lo) and (hi > upper or not fits(hi))
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def with_budget(plan: Plan, shape: ModelShape, strategy, config: Any, run: RunShape, budget: int) -> Plan:
    """Add the fit verdict and the largest batch size and sequence length under ``budget``."""
    if plan.status != "ok":
        return plan
    plan.budget_bytes = budget
    plan.fits = plan.peak_bytes <= budget

    def total(r: RunShape) -> int:
        return sum(peak(shape, r, strategy_memory(strategy, shape, config, r))[0].values())

    max_positions = getattr(shape.config, "max_position_embeddings", None) or 2**20
    plan.max_batch_size = largest_that_fits(lambda b: total(dataclasses.replace(run, batch_size=b)) <= budget, 2**16)
    plan.max_seq_len = largest_that_fits(lambda t: total(dataclasses.replace(run, seq_len=t)) <= budget, max_positions)
    return plan


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '512MiB', '1.5T' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m or not m.group(0).strip():
        raise AdaptersError(f"cannot read the size {text!r}. Write it like 24GiB, 80GB or 512MiB.")
    number, prefix, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    power = "KMGT".index(prefix) + 1 if prefix else 0
    base = 1000 if suffix == "b" and prefix else 1024
    return int(number * base**power)


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


# ---------------------------------------------------------------------------------------- plans


@dataclass
class PlanSettings:
    """What `adapters plan` accepts."""

    model: str = "smollm2-135m"
    strategies: list[str] = field(default_factory=lambda: ["lora"])  # names, NAME@QUANT, or ["all"]
    batch_size: int = 4
    seq_len: int = 512
    task: str | None = None
    gradient_checkpointing: bool = False
    device: str = "cuda"
    options: dict[str, Any] = field(default_factory=dict)
    budget: str | None = None


def _specs(settings: PlanSettings, registry) -> list[str]:
    """Strategy specs to plan: "all" expands to every strategy on every quantization it supports."""
    from .contract import QUANTIZATIONS

    if settings.strategies == ["all"]:
        return [e.strategy.name if q == "none" else f"{e.strategy.name}@{q}"
                for e in registry.entries(aliases=False) for q in QUANTIZATIONS if q in e.strategy.supported_quantization]
    return list(settings.strategies)


def make_plans(settings: PlanSettings) -> dict[str, Any]:
    """Plan every strategy in ``settings``: the library function behind `adapters plan`."""
    from .options import build_config
    from .host import get_registry
    from .contract import traits
    from .runspec import check_quantization, split_strategy

    started = time.perf_counter()
    if settings.device not in RUNTIME_OVERHEAD:
        raise AdaptersError(f"--device {settings.device}: use cuda or cpu.")
    for flag, value in (("--batch-size", settings.batch_size), ("--seq-len", settings.seq_len)):
        if value < 1:
            raise AdaptersError(f"{flag} must be at least 1, not {value}.")
    budget = parse_size(settings.budget) if settings.budget else None
    registry = get_registry()
    specs = _specs(settings, registry)
    if not specs:
        raise AdaptersError("--strategy is empty. Name one, e.g. --strategy lora, or --strategies all.")
    if len(specs) > 1:  # each strategy takes the options it has; one that none has is a typo
        known = {f.name for spec in specs
                 for f in dataclasses.fields(registry.get(split_strategy(spec, None)[0]).config_class)}
        unknown = sorted(k for k in settings.options if k.replace("-", "_") not in known)
        if unknown:
            raise AdaptersError(f"--set {unknown[0]}: none of the planned strategies has that option. "
                                f"Options they have: {', '.join(sorted(known)) or 'none'}.")
    resolved = []
    for spec in specs:  # every name and option checked before any model is built
        name, quantization = split_strategy(spec, None)
        strategy = registry.get(name)
        quantization = quantization or traits(strategy).default_quantization
        options = settings.options if len(specs) == 1 else _accepted(strategy, settings.options)
        resolved.append((spec, strategy, quantization, build_config(strategy.config_class, options, strategy.name)))
    shape = model_shape(settings.model, settings.task, settings.device)
    plans = []
    for spec, strategy, quantization, config in resolved:
        run = RunShape(settings.batch_size, settings.seq_len, shape.task, quantization,
                       settings.gradient_checkpointing, settings.device)
        refusal = _refusal(strategy, run, registry, check_quantization)
        if refusal:
            plans.append(Plan(spec, strategy.name, quantization, "refused", refusal))
            continue
        plan = estimate(shape, strategy, config, run, spec)
        if budget is not None:
            plan = with_budget(plan, shape, strategy, config, run, budget)
        plans.append(plan)
    return {
        "model": settings.model, "task": shape.task, "device": settings.device,
        "dtype": "bfloat16 (autocast)" if settings.device == "cuda" else "float32",
        "batch_size": settings.batch_size, "seq_len": settings.seq_len,
        "gradient_checkpointing": settings.gradient_checkpointing, "budget_bytes": budget,
        "plans": [p.to_dict() for p in plans], "seconds": round(time.perf_counter() - started, 3),
    }


def _accepted(strategy, options: dict[str, Any]) -> dict[str, Any]:
    """With several strategies, each takes the --set options its config has."""
    names = {f.name for f in dataclasses.fields(strategy.config_class)}
    return {k: v for k, v in options.items() if k.replace("-", "_") in names}


def _refusal(strategy, run: RunShape, registry, check_quantization) -> str | None:
    from .contract import traits

    try:
        check_quantization(strategy, run.quantization, registry)
    except AdaptersError as exc:
        return str(exc)
    if run.task not in strategy.supported_tasks:
        return f"does not support the task {run.task}"
    if run.gradient_checkpointing and not traits(strategy).supports_gradient_checkpointing:
        return "cannot be combined with gradient checkpointing"
    return None


def plan_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the plan table."""
    budget = result["budget_bytes"]
    headers = ["strategy", "peak", "weights", "train+grad+opt", "activations", "logits+loss", "peak at"]
    if budget is not None:
        headers += ["verdict", "max batch", "max seq"]
    headers.append("notes")
    rows = []
    for p in result["plans"]:
        if p["status"] != "ok":
            rows.append([p["strategy"], p["status"]] + [""] * (len(headers) - 3) + [p["message"] or ""])
            continue
        c = p["components"]
        row = [p["strategy"], format_bytes(p["peak_bytes"]),
               format_bytes(c["base_weights_quantized"] + c["base_weights_unquantized"]),
               format_bytes(c["trainable_parameters"] + c["gradients"] + c["optimizer_state"] + c["optimizer_step"]),
               format_bytes(c["activations"]), format_bytes(c["logits_and_loss"]), p["peak_phase"]]
        if budget is not None:
            verdict = "fits" if p["fits"] else "does not fit"
            if p["fits"] and p["peak_bytes"] > 0.9 * budget:
                verdict = "fits (tight)"
            row += [verdict, _opt(p["max_batch_size"]), _opt(p["max_seq_len"])]
        rows.append(row + [""])
    return headers, rows


def _opt(n: int | None) -> str:
    return "none fits" if n is None else f"{n:,}"
