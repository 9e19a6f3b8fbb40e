"""One strategy's predicted peak: its own part, the base's part, and the largest of the step's phases.

- the forward: every activation saved so far, plus the last layer's working tensors;
- the loss backward: every activation saved for backward, plus the ``[tokens x vocab]`` log-softmax
  and its two gradient buffers, or with the chunked loss (`adapters.loss`) one chunk's of them;
- a layer's backward (with its recomputation under gradient checkpointing), and for full
  fine-tuning the end of backward, when every gradient exists;
- the optimizer step: every gradient plus AdamW's temporaries (none for fused AdamW). With the optimizer in
  backward there is no such step: each weight is updated as its gradient is whole, so every backward phase holds
  one gradient (at most the largest) and its update's temporaries instead.

With ``offload_activations`` (`adapters.training.offload`, CUDA) the activations saved across layers live in host
memory: the device holds one layer's of them, the one whose copies are in flight in the forward, or that is
back for its backward. Host memory is not planned.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..contract import GRADIENT_FLOWS, EstimatesMemory, ModelShape, RunShape, Strategy, StrategyMemory
from .. import rules
from ..errors import AdaptersError
from ..text import MiB
from .activations import layer_activations, loss, outside_layers, transients
from .processes import distributed_phases, shard_share
from .weights import base_weights

# Memory that is not tensors the step creates. The CPU peak is read from the profiler's tensor
# allocations, which the model accounts for exactly (measured: within 1 MiB on SmolLM2). On CUDA,
# cuBLAS keeps its workspace in the caching allocator (32 MiB on Hopper with the default config).
RUNTIME_OVERHEAD = {"cpu": 0, "cuda": 32 * MiB}

COMPONENTS = {
    "base_weights_quantized": "frozen weights stored quantized, with their scales and double-quant constants",
    "base_weights_unquantized": "frozen weights kept in the compute dtype: embeddings, norms, output head",
    "trainable_parameters": "the weights the strategy trains",
    "optimizer_state": "AdamW's two moments",
    "gradients": "gradients alive at the peak",
    "activations": "tensors saved for backward, alive at the peak",
    "logits_and_loss": "the log-softmax over the vocabulary and its gradient buffers (one chunk's, chunked)",
    "optimizer_step": "AdamW's temporaries during its update",
    "communication_buffers": "with several processes: DDP's gradient buckets, or FSDP's whole weights and gradients "
                             "of the units at work",
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


def strategy_memory(strategy: Strategy, shape: ModelShape, config: Any, run: RunShape) -> StrategyMemory | None:
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
    phases = distributed_phases(shape, run, part, _phases(shape, run, part))
    phase = max(phases, key=lambda p: sum(phases[p].values()))
    components = {k: 0 for k in COMPONENTS}
    components.update(base_weights(shape, run, part.base_parameters_trained))
    components["trainable_parameters"] = part.trainable_bytes
    components["optimizer_state"] = optimizer_state(run, part)
    if run.sharding == "fsdp":  # each process keeps its shard of them
        share = shard_share(shape, run.processes)
        components.update({k: math.ceil(v * share) for k, v in components.items() if k in STATIC_COMPONENTS})
    components.update(phases[phase])
    components["runtime_overhead"] = RUNTIME_OVERHEAD[run.device]
    return components, phase


def _phases(shape: ModelShape, run: RunShape, part: StrategyMemory) -> dict[str, dict[str, int]]:
    """What each phase of the step holds beyond the weights and the optimizer's state."""
    flow = part.gradient_flow
    layer = layer_activations(shape, run, flow, part.extra_attention_tokens)
    layer += part.layer_activation_bytes if flow != "head" else 0
    outside = outside_layers(shape, run, flow)
    # Checkpointed layers (the first n) keep their input alone, the others every tensor their backward reads.
    n = run.checkpointed_layers(shape.num_layers) if flow != "head" else 0
    every = n == shape.num_layers
    checkpointed = n > 0
    layer_input = run.tokens * shape.hidden_size * run.compute_bytes
    kept = n * layer_input + (shape.num_layers - n) * layer
    if flow == "inputs" and not checkpointed and shape.family == "llama":  # the embeddings' output needs
        kept -= run.tokens * (shape.hidden_size + 1) * 4  # no gradient: layer 0's first norm keeps nothing
    if run.offload_activations:  # in host memory, but for the layer whose copies are in flight, or back for backward
        kept = min(kept, layer_input if every else layer)
    forward, working = transients(shape, run)
    phases: dict[str, dict[str, int]] = {
        "forward": {"activations": kept + forward},
        "loss backward": {"activations": kept + outside, "logits_and_loss": loss(shape, run, flow)},
    }
    if flow != "head":
        # A layer's backward: its saved tensors (recomputed under checkpointing) plus the gradients in flight through
        # it. Backward begins at the last layer: checkpointed, it recomputes its tensors on top of everything kept;
        # kept, its own are there already, and by the first checkpointed layer the later ones' are gone.
        phases["layer backward"] = {"activations": kept + outside + (layer if every else 0) + working}
        if flow == "weights":  # the first layer's backward, with every other gradient already made
            first = n * layer_input + layer + working
            phases["end of backward"] = {"gradients": part.trainable_bytes, "activations": first}
    if not run.optimizer_in_backward:
        phases["optimizer step"] = {"gradients": part.trainable_bytes,
                                    "optimizer_step": _adamw_temporaries(run, part.trainable_bytes)}
        return phases
    # In backward each weight steps as soon as its gradient is whole, and the gradient goes: the layers' backward
    # holds one at a time, at most the largest (a tied embedding's, begun by the output head at the end of the loss's
    # backward, lives until the embedding's own backward ends it), with that one tensor's update. The loss's own
    # peak comes before the head's gradient (measured: SmolLM2 full fine-tuning, benchmarks/optimizer_options.py).
    largest = part.largest_trainable_tensor_bytes
    one = {"gradients": largest, "optimizer_step": _adamw_temporaries(run, largest)}
    for name in phases.keys() & {"layer backward", "end of backward"}:
        phases[name] = {**phases[name], **one}
    return phases


# bitsandbytes' 8-bit AdamW: per weight two one-byte states where AdamW has two float32 ones, plus a float32
# absmax for each state per block of 256 weights.
EIGHT_BIT_STATE_RATIO = (2 + 2 * 4 / 256) / 8


def optimizer_state(run: RunShape, part: StrategyMemory) -> int:
    """The optimizer's states: AdamW's two float32 moments (or the strategy's own count), or bitsandbytes' 8-bit
    ones (`EIGHT_BIT_STATE_RATIO` of them)."""
    adamw = 2 * part.trainable_bytes if part.optimizer_state_bytes is None else part.optimizer_state_bytes
    if run.optimizer in rules.EIGHT_BIT_OPTIMIZERS:
        return math.ceil(adamw * EIGHT_BIT_STATE_RATIO)
    return adamw


def _adamw_temporaries(run: RunShape, updated: int) -> int:
    """AdamW's temporaries in the form `adapters.rules.optimizer` gives the device: fused updates each tensor in
    place, with none; foreach makes one the size of every trainable tensor at once. bitsandbytes' 8-bit AdamW on
    the CPU was measured holding about as much as foreach (SmolLM2 full fine-tuning: 566 MB of temporaries for
    538 MB of weights, tests/test_optimizers.py); on CUDA its kernel updates in place (to be measured). ``updated``:
    the bytes of the weights one update takes at once (all of them; in backward, one tensor)."""
    form = run.engine.optimizer
    if form == "adamw-foreach" or (form in rules.EIGHT_BIT_OPTIMIZERS and run.device == "cpu"):
        return updated
    return 0


def estimate(shape: ModelShape, strategy: Strategy, config: Any, run: RunShape, spec: str | None = None) -> Plan:
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
