"""The engine's rules, each written once: how a run computes, decided from its settings and device alone.

train and the conformance kit (`adapters.training`), bench (which measures a training session) and plan (which
predicts one) all read these, so they cannot disagree about what a run does:

- the label the loss skips (`IGNORE_INDEX`);
- the causal-LM loss path: in chunks of `DEFAULT_LOSS_CHUNK` tokens through the model's own head, or the model's
  own loss over the whole logits (`loss_path`);
- whether the decoder layers run under torch.compile (`compiles`), which is on by default where it was measured to
  pay (`COMPILE_BY_DEFAULT`), and never by default under sharding;
- whether gated MLPs recompute their activation in backward (`recomputes_mlp`);
- the optimizer (`optimizer`): AdamW, fused where torch has a fused kernel for the device; or, where the run asks
  for it (`OPTIMIZERS`), bitsandbytes' 8-bit AdamW, paged or not;
- the optimizer in backward (`in_backward_refusal`): where stepping each weight as soon as its gradient is whole
  cannot give the update of the plain step, and is refused;
- the weights' dtypes (`base_dtype`, `weights_dtype`): float32 master weights of what trains (``--master-weights
  fp32``), or everything in bf16 (``none``).

`engine` puts them together for one run; its `Engine` is what plan, bench reports and train results record.
Nothing here imports torch: plan and the CLI read the rules without it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# The label the loss skips: a prompt's tokens, padding (transformers' and torch's cross-entropy default).
IGNORE_INDEX = -100

# Tokens a chunk's logits are made for. Measured by benchmarks/loss_chunk.py on SmolLM2 (vocabulary 49,152):
# below it the step slows for little saved memory; above it the chunk's logits and their gradient dominate
# the loss's memory again (benchmarks/results/loss-chunk-cpu-2core.json).
DEFAULT_LOSS_CHUNK = 256

# torch.compile of each decoder layer, on by default per device type. CUDA: on; a compiled decoder (with a chunked
# loss) gave LoRA 1.40x the tokens/s of plain LoRA on an H200 (the plain stack's numbers). CPU: off;
# benchmarks/results/compile-cpu-2core.json measured 0.91x (LoRA) and 1.02x (full fine-tuning) on SmolLM2 at batch
# 2 x 256, a gain that does not pay for compiling (about 30-50 s the first time, a few seconds from inductor's cache).
COMPILE_BY_DEFAULT = {"cuda": True, "cpu": False}

# Device types torch has a fused AdamW kernel for (the CPU's since torch 2.4, this project's floor): one kernel for
# every tensor, no host synchronisation, no temporaries the size of the weights. Elsewhere, foreach.
FUSED_ADAMW_DEVICES = frozenset({"cuda", "cpu"})


def compiles(asked: bool | None, device: str, sharding: str = "none") -> bool:
    """Whether the decoder layers run compiled: as asked (--compile / --no-compile), else the device's default,
    which is off under sharding (FSDP's units are not compiled here)."""
    if asked is not None:
        return asked
    return sharding == "none" and COMPILE_BY_DEFAULT.get(device, False)


def recomputes_mlp(gradient_checkpointing: bool, compiled: bool, checkpoint_layers: int | None = None) -> bool:
    """Whether gated MLPs keep only their two projections for backward and recompute the activation and product
    there: not when every layer is recomputed already (gradient checkpointing of all of them), nor under
    torch.compile, whose partitioner makes its own choice of what to keep. With some layers checkpointed
    (``checkpoint_layers``), the others' MLPs still recompute."""
    return (not gradient_checkpointing or checkpoint_layers is not None) and not compiled


# The optimizers a run may ask for (RunSpec.optimizer). adamw: torch's, float32 states (8 bytes a weight);
# adamw8bit: bitsandbytes' blockwise 8-bit states (2 bytes a weight and a float32 absmax per block of 256);
# paged_adamw8bit: the same with its states in paged (unified) memory on CUDA. bitsandbytes 0.50's 8-bit
# optimizers run on the CPU too (measured: tests/test_optimizers.py), where paging has nothing to page to.
EIGHT_BIT_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit")
OPTIMIZERS = ("adamw", *EIGHT_BIT_OPTIMIZERS)
DEFAULT_OPTIMIZER = "adamw"


def optimizer(device: str, kind: str | None = None) -> str:
    """The optimizer's form on ``device``: for AdamW "adamw-fused" or "adamw-foreach" (neither synchronises with the
    host); for an 8-bit one (``kind``) its name, "adamw8bit" or "paged_adamw8bit"."""
    kind = kind or DEFAULT_OPTIMIZER
    if kind != "adamw":
        return kind
    return "adamw-fused" if device in FUSED_ADAMW_DEVICES else "adamw-foreach"


# The optimizer in backward (--optimizer-in-backward): one optimizer per trainable weight, stepped (and its gradient
# freed) from the weight's post-accumulate-grad hook, as torchtune does; whole-model gradients never exist at once.
def in_backward_refusal(*, gradient_accumulation_steps: int = 1, max_grad_norm: float = 0.0, sharding: str = "none",
                        processes: int = 1) -> str | None:
    """Why ``--optimizer-in-backward`` cannot give the plain step's update for this run, with one fix; None where it
    can. Each weight is stepped as soon as its gradient is whole, so nothing may need every gradient first."""
    if gradient_accumulation_steps > 1:
        return (f"--optimizer-in-backward steps each weight during backward, so it cannot accumulate "
                f"--gradient-accumulation-steps {gradient_accumulation_steps} micro-batches first. Use "
                "--gradient-accumulation-steps 1 (a larger --batch-size, or --gradient-checkpointing to fit one), or "
                "drop --optimizer-in-backward.")
    if max_grad_norm > 0:
        return (f"--optimizer-in-backward steps each weight before the other gradients exist, so it cannot clip them "
                f"to their total norm (--max-grad-norm {max_grad_norm:g}). Pass --max-grad-norm 0, or drop "
                "--optimizer-in-backward.")
    if sharding != "none":
        return (f"--optimizer-in-backward cannot run under --sharding {sharding}: FSDP reduces and shards the "
                "gradients after the hooks would have stepped. Use --sharding none, or drop --optimizer-in-backward.")
    if processes > 1:
        return (f"--optimizer-in-backward cannot run in {processes} processes: data parallelism averages the gradients "
                "across them after the hooks would have stepped. Run one process, or drop --optimizer-in-backward.")
    return None


# --master-weights: fp32 keeps float32 master copies of what trains (the mixed-precision recipe, see
# adapters.training.model); none trains in bf16 throughout, base and trained weights alike, with AdamW's moments and
# the gradients in bf16 too: half the bytes of each, for updates that round at bf16's resolution.
MASTER_WEIGHTS = ("fp32", "none")
DEFAULT_MASTER_WEIGHTS = "fp32"


# --mixed-precision: bf16 computes under bf16 autocast, the base loaded in bf16 and what trains kept in float32 (with
# --master-weights fp32); no computes in the weights' dtype. Unset, each device's default: bf16 on CUDA; no on the
# CPU, where bf16 pays only on CPUs with native bf16 instructions (AVX512-BF16, AMX).
MIXED_PRECISION = ("bf16", "no")


def autocasts(device: str, mixed_precision: str | None = None) -> bool:
    """Whether a run on ``device`` (a device type) computes under bf16 autocast: as ``--mixed-precision`` asks,
    else on CUDA only."""
    return device == "cuda" if mixed_precision is None else mixed_precision == "bf16"


def base_dtype(device: str, master_weights: str = DEFAULT_MASTER_WEIGHTS, mixed_precision: str | None = None) -> str:
    """The dtype the base loads in on ``device`` (a device type): bf16 under bf16 autocast (CUDA's default,
    ``--mixed-precision bf16`` elsewhere) or when the run trains in bf16 throughout (``master_weights="none"``);
    else float32, the CPU's default."""
    return "bfloat16" if master_weights == "none" or autocasts(device, mixed_precision) else "float32"


def weights_dtype(device: str, master_weights: str = DEFAULT_MASTER_WEIGHTS, mixed_precision: str | None = None) -> str:
    """The dtype the trained weights are kept in (and so their gradients and AdamW's moments): float32 master
    weights, or with ``master_weights="none"`` the base's dtype, bf16."""
    return "float32" if master_weights == "fp32" else base_dtype(device, master_weights, mixed_precision)


def loss_chunk(asked: int | None) -> int:
    """The causal-LM loss chunk in tokens: as asked (0: the model's own loss), else `DEFAULT_LOSS_CHUNK`."""
    return DEFAULT_LOSS_CHUNK if asked is None else asked


def loss_path(task: str, asked_chunk: int | None) -> str:
    """How the loss is computed: ``"chunked(N)"`` for a causal LM, or ``"model"``, its own ``labels=`` loss (every
    sequence classifier, and ``--loss-chunk 0``). On CUDA with liger-kernel installed a plain linear head takes
    Liger's fused loss ("liger") instead of the chunks; a model whose forward does more to its logits than the
    chunks can do falls back to "model" at its first step (`adapters.loss`)."""
    chunk = loss_chunk(asked_chunk)
    return f"chunked({chunk})" if task == "causal-lm" and chunk else "model"


@dataclass(frozen=True)
class Engine:
    """How one run computes, as the rules decide it."""

    device: str  # the device type: "cuda", "cpu", ...
    compiled: bool
    recomputes_mlp: bool
    optimizer: str
    loss_path: str
    ignore_index: int = IGNORE_INDEX

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine(device: str, task: str, *, compile: bool | None = None, sharding: str = "none",
           gradient_checkpointing: bool = False, checkpoint_layers: int | None = None, loss_chunk: int | None = None,
           optimizer_kind: str | None = None) -> Engine:
    """Every rule for one run on ``device`` (a device type)."""
    compiled = compiles(compile, device, sharding)
    return Engine(device, compiled, recomputes_mlp(gradient_checkpointing, compiled, checkpoint_layers),
                  optimizer(device, optimizer_kind), loss_path(task, loss_chunk))


def offload_refusal(device: str) -> str | None:
    """Why ``--offload-activations`` cannot run on ``device`` (a device type), or None where it can."""
    if device == "cuda":
        return None
    return (f"--offload-activations moves saved activations from the accelerator to host memory; on {device!r} "
            "they are in host memory already, so it would save nothing. Drop --offload-activations, or use "
            "--gradient-checkpointing to cut activation memory on this device.")
