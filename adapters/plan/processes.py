"""One process's part of a run of several (`RunShape.processes`, ``batch_size`` rows each): what it holds beyond
the single-process step of its own rows.

- **Data parallel** (``sharding="none"``): the whole model in every process, and DDP's gradient buckets, one
  flat copy of every gradient that the all-reduce works on, alive from DDP's set-up on.
- **Sharded** (``sharding="fsdp"``, FSDP2): every parameter split along its first dimension, padded to a multiple
  of the processes, so weights, gradients and AdamW's states are each process's shard. Beside them, the units at
  work are whole: the root (embeddings, final norm, head) gathered for the forward and again for the backward,
  and decoder layers (with the strategy's own modules in them, such as LoRA's adapters), each gathered while it
  runs and its next one prefetched; in backward, the whole gradients of the unit being reduced and the flat copy
  its reduce-scatter reads. On the CPU, gloo's all-gather makes flat copies of its own too.
"""
from __future__ import annotations

import math

from ..contract import ModelShape, RunShape, StrategyMemory

# Whole decoder layers alive at once on top of the step, under FSDP2: the layer at work and the next one,
# prefetched; with gloo (the CPU), all-gather outputs and gloo's own flat copies besides. How many of those overlap
# depends on when gloo's thread runs: on the CPU with 2 processes, random:tiny's per-process peaks varied from run
# to run, and between the processes of one run, by up to 1.5 layers' worth (1.62 to 2.01 MB for full fine-tuning,
# 1.44 to 1.65 MB for LoRA); 2.5 is their middle.
GATHERED_LAYERS = {"cpu": 2.5, "cuda": 2}


def shard_share(shape: ModelShape, processes: int) -> float:
    """The share of the weights' bytes that one of ``processes`` keeps under FSDP2: each parameter's first
    dimension padded to a multiple of the processes, then split."""
    key = ("shard", processes)
    if key not in shape.weights_cache:
        whole = kept = 0
        for p in shape.meta_model.parameters():
            rows = p.shape[0] if p.dim() else 1
            whole += p.numel()
            kept += math.ceil(rows / processes) * (p.numel() // max(rows, 1))
        shape.weights_cache[key] = kept / whole if whole else 1.0
    return shape.weights_cache[key]


def unit_elements(shape: ModelShape) -> tuple[int, int]:
    """(elements of the largest decoder layer, elements outside the layers): FSDP2's units, one per layer (the
    model's ``_no_split_modules``) and the root."""
    model = shape.meta_model
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    in_layers = {id(p) for m in layers for p in m.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)
    return max((sum(p.numel() for p in m.parameters()) for m in layers), default=0), root


def distributed_phases(shape: ModelShape, run: RunShape, part: StrategyMemory,
                       phases: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """``phases`` (one process's step) with what a run of ``run.processes`` adds to each: its
    "communication_buffers", and under FSDP2 the gradients and AdamW's temporaries of a shard."""
    if run.sharding != "fsdp":
        if run.processes == 1:
            return phases
        return {name: {**held, "communication_buffers": part.trainable_bytes} for name, held in phases.items()}
    share = shard_share(shape, run.processes)
    layer, root = unit_elements(shape)
    # What the strategy adds to the units (its own trainable modules): in the layers (LoRA's adapters), or in the
    # root (prefix tuning's virtual tokens, a probe's head).
    added = part.trainable_bytes - part.base_parameters_trained * run.master_bytes
    in_layers = added // max(shape.num_layers, 1) if part.gradient_flow == "inputs" and \
        not part.extra_attention_tokens else 0
    gathered = root * run.compute_bytes + (added if not in_layers else 0) + \
        int(GATHERED_LAYERS[run.device] * (layer * run.compute_bytes + in_layers))
    # The whole gradients of the unit being reduced (a layer's or the root's trainable part), and the flat copy of them
    # that its reduce-scatter reads.
    if part.gradient_flow == "head":
        unit_gradients = part.trainable_bytes
    elif part.gradient_flow == "weights":
        unit_gradients = max(layer, root) * run.master_bytes
    else:
        unit_gradients = part.trainable_bytes // max(shape.num_layers, 1)
    out = {}
    for name, held in phases.items():
        held = {k: math.ceil(v * share) if k in ("gradients", "optimizer_step") else v for k, v in held.items()}
        if name != "optimizer step":
            # The loss's backward makes the head's gradient, which the loss's part already counts.
            backward = name in ("layer backward", "end of backward")
            held["communication_buffers"] = gathered + (2 * unit_gradients if backward else 0)
        out[name] = held
    return out
