"""The conformance checks, each declared once with `check`: its name, where it runs, what it verifies.

A check is a function of the `Harness` (and, but for those that run once, of a task and a
quantization) that returns a one-line detail when it passes, raises `AssertionError` saying what
is wrong when it fails, and raises `Skip` when it cannot run. The registry's order is the order of
a report's rows; `adapters.testing.runner` runs them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..contract import EstimatesMemory, Strategy, traits, validate_strategy
from ..checkpoints import Position
from ..nn import count_parameters
from ..runspec import StrategyRefused
from .harness import LABELS, STEPS, Harness, Skip

MEMORY_BATCH = (4, 128)  # the memory-estimate check's batch: large enough for activations to matter
MEMORY_TOLERANCE = 0.15  # the CPU target of the planner
# The merge check against a model trained on an int8 base, relative to the logits' scale: bitsandbytes'
# int8 matmul rounds the activations to int8 too (0.6% of the scale on the kit's model), so the merged
# float model cannot match it as closely as it matches nf4 and fp4, which compute on dequantized weights.
INT8_TOLERANCE = 5e-2

# Where a check runs: the runner sweeps the tasks and quantizations for all but "strategy".
EACH = {
    "strategy": "once",
    "cell": "each declared task and quantization",
    "undeclared-cell": "each undeclared task or quantization",
    "task": "each declared task, on one declared quantization",
}


@dataclass(frozen=True)
class Check:
    name: str
    each: str  # a key of EACH
    doc: str  # what passing means
    fn: Callable[..., str]
    # Nothing after it can run when it fails: the run stops ("strategy"), or the rest of its cell is skipped.
    required: bool = False
    # Runs only when asked for (`run_checks(..., optional=[name])`, `adapters check --with NAME`): it takes long.
    optional: bool = False


REGISTRY: dict[str, Check] = {}


def check(name: str, *, each: str, doc: str, required: bool = False, optional: bool = False) -> Callable:
    """Declare a check; a report lists the checks in the order they are declared."""
    if each not in EACH:
        raise ValueError(f"each={each!r}: use one of {', '.join(EACH)}")

    def register(fn: Callable[..., str]) -> Callable[..., str]:
        if name in REGISTRY:
            raise ValueError(f"check {name!r} is declared twice")
        REGISTRY[name] = Check(name, each, doc, fn, required, optional)
        return fn

    return register


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    finally:
        model.train(was_training)


def _names(names: Iterable[str], limit: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------


@check("declaration", each="strategy", required=True,
       doc="the name and the declaration satisfy the strategy contract")
def declaration(h: Harness) -> str:
    problems = validate_strategy(h.strategy)
    if problems:
        raise AssertionError("; ".join(problems))
    if not isinstance(h.strategy, Strategy):
        raise AssertionError("does not satisfy the adapters.Strategy protocol")
    return (f"quantization: {', '.join(sorted(h.strategy.supported_quantization))}; "
            f"tasks: {', '.join(sorted(h.strategy.supported_tasks))}")


@check("config-defaults", each="strategy", required=True,
       doc="the config dataclass constructs from its defaults, through --set and a manifest's JSON")
def config_defaults(h: Harness) -> str:
    from ..options import build_config, describe_options

    config_class = h.strategy.config_class
    config = config_class()
    if build_config(config_class, {}, h.name) != config:
        raise AssertionError("build_config with no options differs from config_class()")
    values = dataclasses.asdict(config)
    try:
        text = json.dumps(values, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"the defaults {values!r} are not JSON, so no manifest can hold them: {exc}") from None
    restored = build_config(config_class, json.loads(text), h.name)
    if restored != config:
        raise AssertionError(f"the defaults do not survive the manifest's JSON: {restored!r} != {config!r}")
    describe_options(config_class)
    return " ".join(f"{k}={v}" for k, v in values.items()) or "no options"


@check("apply", each="cell", required=True,
       doc="apply returns a model with at least one trainable floating-point parameter, the same set on every "
           "apply under one seed, as many as expected_trainable_parameters declares (if defined) and as "
           "adapters.count_parameters counts")
def apply(h: Harness, task: str, quantization: str) -> str:
    run = h.run(task, quantization)
    if not run.names:
        raise AssertionError("apply left no parameter trainable")
    params = dict(run.model.named_parameters())
    not_float = [n for n in run.names if not params[n].is_floating_point()]
    if not_float:
        raise AssertionError(f"non-floating-point parameters are left trainable: {_names(not_float)}")
    hand = sum(params[n].numel() for n in run.names)
    if run.count.trainable != hand:
        raise AssertionError(f"count_parameters says {run.count.trainable:,} trainable, the trainable "
                             f"tensors hold {hand:,}")
    if run.declared is not None and run.declared != run.count.trainable:
        raise AssertionError(f"expected_trainable_parameters declares {run.declared:,} trainable, apply left "
                             f"{run.count.trainable:,}")
    again = h.run(task, quantization, replica=1)
    if set(again.names) != set(run.names):
        extra, missing = sorted(set(again.names) - set(run.names)), sorted(set(run.names) - set(again.names))
        raise AssertionError(f"a second apply under the same seed leaves other parameters trainable: "
                             f"+{_names(extra)} -{_names(missing)}")
    declared = "" if run.declared is None else ", as declared"
    return f"{len(run.names)} trainable tensors, {hand:,} of {run.count.total:,} parameters{declared}"


@check("train-step", each="cell",
       doc=f"after {STEPS} AdamW steps every trainable parameter changed and no frozen one did")
def train_step(h: Harness, task: str, quantization: str) -> str:
    run = h.run(task, quantization)
    if not run.names:
        raise Skip("nothing is trainable")
    params = dict(run.model.named_parameters())
    unchanged = [n for n in run.names if torch.equal(params[n].detach(), run.before[n])]
    if unchanged:
        raise AssertionError(f"{len(unchanged)} of {len(run.names)} trainable tensors did not change after "
                             f"{STEPS} steps (no gradient reaches them?): {_names(unchanged)}")
    moved = [n for n, before in run.frozen.items() if not torch.equal(params[n].detach(), before)]
    if moved:
        raise AssertionError(f"{len(moved)} frozen tensors changed during training: {_names(moved)}")
    return f"loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f}; {len(run.frozen)} frozen tensors unchanged"


@check("param-count", each="cell",
       doc="trainable and total counts match a hand count, and under nf4/fp4/int8 equal the unquantized model's "
           "(4-bit packing counted as the weights it holds)")
def param_count(h: Harness, task: str, quantization: str) -> str:
    run = h.run(task, quantization)
    count, params = run.count, list(run.model.parameters())
    hand_trainable = sum(p.numel() for p in params if p.requires_grad)
    if count.trainable != hand_trainable:
        raise AssertionError(f"count_parameters says {count.trainable:,} trainable, a hand count {hand_trainable:,}")
    if quantization == "none":
        hand_total = sum(p.numel() for p in params)
        if count.total != hand_total:
            raise AssertionError(f"count_parameters says {count.total:,} in all, a hand count {hand_total:,}")
        return f"{count.trainable:,} trainable of {count.total:,}"
    reference = h.reference_count(task, quantization)
    if (count.trainable, count.total) != (reference.trainable, reference.total):
        raise AssertionError(f"under {quantization}: {count.trainable:,} trainable of {count.total:,}; "
                             f"unquantized: {reference.trainable:,} of {reference.total:,}")
    stored = sum(p.numel() for p in params)
    packed = f" ({stored:,} stored elements)" if stored != count.total else ""
    return f"{count.trainable:,} trainable of {count.total:,}{packed}, as unquantized"


@check("determinism", each="cell",
       doc="two runs under one seed give identical losses and weights (bit for bit on the CPU, where the kit trains "
           "on one thread with deterministic algorithms)")
def determinism(h: Harness, task: str, quantization: str) -> str:
    """Two runs under one seed, compared bit for bit on the CPU, within a relative 1e-3 elsewhere.

    No tolerance on the CPU, by design. AdamW's first steps move a weight by about the learning rate
    whatever the size of its gradient, so a last-bit difference in a gradient near zero becomes a
    difference of up to twice the learning rate in a weight. A tolerance that wide would also pass a
    strategy whose unseeded dropout or initialisation shows only at that scale. So the kit removes the
    sources of last-bit noise instead (`harness.reproducible`: one thread, deterministic algorithms),
    and a difference that remains is the strategy's. On a GPU some kernels differ in the last bits even
    so, hence the tolerance there (`Harness.same`).
    """
    first, second = h.run(task, quantization), h.run(task, quantization, replica=1)
    ops = sorted(set(first.nondeterministic_ops) | set(second.nondeterministic_ops))
    setting = "the kit trains on one thread with deterministic algorithms" + (
        f", but these ops have none: {_names(ops)}; otherwise" if ops else ", so") + \
        " look for random numbers the seed does not govern (a generator of its own, the time)"
    if not h.same_losses(first.losses, second.losses):
        step = next((i for i, (a, b) in enumerate(zip(first.losses, second.losses), 1) if a != b), None)
        raise AssertionError(f"losses differ between two runs under one seed from step {step}: {first.losses} vs "
                             f"{second.losses}; {setting}")
    p1, p2 = dict(first.model.named_parameters()), dict(second.model.named_parameters())
    differ = [n for n in first.names if n in p2 and not h.same(p1[n].detach(), p2[n].detach())]
    if differ:
        largest = max(float((p1[n].detach().float() - p2[n].detach().float()).abs().max()) for n in differ)
        raise AssertionError(f"trained weights differ between two runs under one seed (by up to {largest:.3g}): "
                             f"{_names(differ)}; {setting}")
    compared = "bit for bit" if h.exact else "within a relative 1e-3"
    return f"the same losses and weights over {STEPS} steps, {compared}"


@check("save-load", each="cell",
       doc="adapters.save then adapters.load onto a freshly loaded base reproduces the outputs")
def save_load(h: Harness, task: str, quantization: str) -> str:
    from ..store import load, save

    trained = h.run(task, quantization)
    model = trained.model
    _move_trained(model, trained.names, h.seed + 7)
    batch = h.batch(trained.run, trained.base)
    expected = _logits(model, batch)
    directory = save(model, h.workdir / f"save-{task}-{quantization}", strategy=h.strategy,
                     config=trained.run.config, base=trained.base)
    files = ", ".join(sorted(p.name for p in directory.iterdir()))
    fresh = h.fresh_base(trained.run)
    if torch.allclose(expected, _logits(fresh.model, batch), rtol=1e-5, atol=1e-6):
        raise AssertionError("the outputs did not change when every trainable weight did, so a round trip "
                             "proves nothing; the trainable weights do not reach the outputs")
    loaded = load(directory, base=fresh)
    got = _logits(loaded.model, batch)
    if got.shape != expected.shape:
        raise AssertionError(f"outputs after loading have shape {tuple(got.shape)}, before saving "
                             f"{tuple(expected.shape)}")
    diff = float((got - expected).abs().max())
    tolerance = 1e-4 * max(1.0, float(expected.abs().max())) * (1 if h.exact else 100)
    if not diff <= tolerance:
        raise AssertionError(f"outputs differ by up to {diff:.3g} after save -> load: "
                             f"{_lost_weights(h, model, loaded.model, trained.names)}; the saved files ({files}) "
                             "do not hold them, or load does not restore them")
    return f"outputs reproduced (max difference {diff:.1e}); saved {files}"


def _move_trained(model: torch.nn.Module, names: list[str], seed: int) -> None:
    """Move every trained weight well away from its initial value, so that a lost one shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            param = model.get_parameter(name)
            param.add_((0.05 * torch.randn(param.shape, generator=generator)).to(param.device, param.dtype))


def _lost_weights(h: Harness, saved: torch.nn.Module, loaded: torch.nn.Module, trained: list[str]) -> str:
    """Which weights of ``saved`` the ``loaded`` model does not have, by name: trained, or new and frozen.

    ``loaded`` is built on a base loaded under another seed, so a frozen weight that differs there came
    out of chance (a new head), not out of the base checkpoint.
    """
    before, after = dict(saved.named_parameters()), dict(loaded.named_parameters())
    missing = [n for n in before if n not in after]
    differ = [n for n in before if n in after and (before[n].shape != after[n].shape
                                                   or not h.same(before[n].detach(), after[n].detach()))]
    changed = [n for n in differ if n in trained]
    fresh = [n for n in differ if n not in trained]
    parts = [f"{label}: {_names(names)}" for label, names in (
        ("trained weights that differ after reload", changed),
        ("newly initialised frozen weights (not in the base checkpoint) that differ after reload", fresh),
        ("weights missing after reload", missing)) if names]
    return "; ".join(parts) or "every weight is the same after reload, so load or the model's forward differs"


@check("refused", each="undeclared-cell",
       doc="an undeclared quantization or task is refused up front, naming it")
def refused(h: Harness, task: str, quantization: str) -> str:
    undeclared = quantization if quantization not in h.strategy.supported_quantization else task
    try:
        h.resolve(task, quantization)
    except StrategyRefused as exc:
        message = str(exc)
        if undeclared not in message or h.name not in message:
            raise AssertionError(f"refused, but the message names neither {h.name!r} nor {undeclared!r}: "
                                 f"{message}") from None
        return message
    raise AssertionError(f"{undeclared} is not declared, but adapters train accepted it")


@check("gradient-checkpointing", each="task",
       doc="with checkpointing the loss and gradients equal those without it, or --gradient-checkpointing is "
           "refused up front")
def gradient_checkpointing(h: Harness, task: str, quantization: str) -> str:
    if not traits(h.strategy).supports_gradient_checkpointing:
        try:
            h.resolve(task, quantization, gradient_checkpointing=True)
        except StrategyRefused as exc:
            return f"refused up front: {exc}"
        raise AssertionError("supports_gradient_checkpointing is False, but adapters train accepted "
                             "--gradient-checkpointing")
    plain = h.run(task, quantization)
    checkpointed = h.train(task, quantization, checkpointing=True)
    if checkpointed.names != plain.names:
        raise AssertionError("with checkpointing, other parameters are trainable")
    if not math.isclose(checkpointed.losses[0], plain.losses[0], rel_tol=1e-4, abs_tol=1e-6):
        raise AssertionError(f"the loss with checkpointing is {checkpointed.losses[0]}, without {plain.losses[0]}")
    wrong = []
    for name in plain.names:
        a, b = plain.grads.get(name), checkpointed.grads.get(name)
        if (a is None) != (b is None) or (a is not None and not torch.allclose(a, b, rtol=1e-3, atol=1e-6)):
            wrong.append(name)
    if wrong:
        raise AssertionError(f"gradients with checkpointing differ from those without: {_names(wrong)}")
    return "the same loss and gradients with checkpointing as without"


@check("pipeline", each="task",
       doc="adapters train runs it by name for one step, saves, and adapters.load restores it")
def pipeline(h: Harness, task: str, quantization: str) -> str:
    from ..runspec import RunSpec
    from ..store import load
    from ..training import train

    out = h.workdir / f"pipeline-{task}"
    result = train(RunSpec(model=h.model, strategy=h.name, quantization=quantization, task=task, max_steps=1,
                           batch_size=2, seq_len=32, eval_batches=1, seed=h.seed, output=str(out)), progress=False)
    loaded = load(out)
    if loaded.strategy.name != h.name:
        raise AssertionError(f"adapters.load restored strategy {loaded.strategy.name!r}")
    return f"trained {result.parameters.trainable:,} parameters for 1 step, saved and reloaded"


RESUME_STEPS, RESUME_STOP = 4, 2  # a run of 4 steps (2 micro-batches each), stopped after step 2


@check("resume", each="task",
       doc=f"a run stopped after step {RESUME_STOP} and resumed from its checkpoint ends with the same losses and "
           "trainable weights as an uninterrupted run")
def resume(h: Harness, task: str, quantization: str) -> str:
    from ..nn import trainable_parameters
    from ..resuming import resume_spec
    from ..runspec import RunSpec
    from ..training import train

    spec = dict(model=h.model, strategy=h.name, quantization=quantization, task=task, max_steps=RESUME_STEPS,
                gradient_accumulation_steps=2, batch_size=2, seq_len=32, eval_batches=1, seed=h.seed, save_every=2)
    whole = train(RunSpec(**spec, output=str(h.workdir / f"resume-{task}-whole")), progress=False)
    out = h.workdir / f"resume-{task}-stopped"
    stopped = train(RunSpec(**spec, output=str(out)), progress=False, stop=lambda step: step == RESUME_STOP)
    if stopped.status != "interrupted" or not stopped.checkpoints:
        raise AssertionError(f"stopping after step {RESUME_STOP} gave status {stopped.status!r} "
                             f"and {len(stopped.checkpoints)} checkpoint(s)")
    resumed = train(resume_spec(out, {}, {}), progress=False)
    if resumed.status != "completed" or resumed.steps != RESUME_STEPS:
        raise AssertionError(f"the resumed run ended {resumed.status!r} after {resumed.steps} steps: {resumed.reason}")
    expected, got = dict(trainable_parameters(whole.trained)), dict(trainable_parameters(resumed.trained))
    if expected.keys() != got.keys():
        raise AssertionError(f"the resumed run trains other parameters: {_names(expected.keys() ^ got.keys())}")
    tolerance = 1e-6 if h.exact else 1e-3
    diff = max(float((expected[n].float() - got[n].float()).abs().max()) for n in expected)
    if diff > tolerance or not _close(whole.losses, resumed.losses, tolerance):
        raise AssertionError(f"resumed weights differ by up to {diff:.3g} (tolerance {tolerance:g}), losses "
                             f"{resumed.losses} against {whole.losses}: the checkpoint does not hold everything the "
                             "run needs (weights, optimizer, data position, random state)")
    return (f"stopped after step {RESUME_STOP}, resumed to step {RESUME_STEPS}: the same losses and "
            f"{len(expected)} trainable tensors (max difference {diff:.1e})")


def _close(a: list[float | None], b: list[float | None], tolerance: float) -> bool:
    return len(a) == len(b) and all(x is not None and y is not None and abs(x - y) <= tolerance * max(1.0, abs(x))
                                    for x, y in zip(a, b))


@check("merge", each="task",
       doc="skipped without adapters.Merges; otherwise, after every trainable weight is moved, adapters merge writes "
           "a checkpoint that plain transformers loads (no PEFT, no adapters code) and that gives the trained "
           "model's outputs")
def merge(h: Harness, task: str, quantization: str) -> str:
    from transformers import AutoConfig

    from ..contract import Merges
    from ..merge import merge_run, reload
    from ..store import save

    if not isinstance(h.strategy, Merges):
        reason = getattr(h.strategy, "merge_refusal", None)
        raise Skip("does not declare adapters.Merges" + (f": {reason}" if reason else ""))
    trained = h.run(task, quantization)
    _move_trained(trained.model, trained.names, h.seed + 11)
    batch = h.batch(trained.run, trained.base)
    expected = _logits(trained.model, batch)
    run = save(trained.model, h.workdir / f"merge-run-{task}", strategy=h.strategy, config=trained.run.config,
               base=trained.base, overwrite=True)
    result = merge_run(run, h.workdir / f"merged-{task}", dtype="fp32", overwrite=True, device=h.device)
    config = AutoConfig.from_pretrained(result.output).to_dict()
    if any(key in config for key in ("quantization_config", "auto_map")) or "peft" in json.dumps(config).lower():
        raise AssertionError("the merged checkpoint's config.json still names quantization, PEFT or remote code")
    merged = reload(result.output, task, h.device)
    diff = float((_logits(merged, batch) - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    tolerance = 1e-4 * scale * (1 if h.exact else 100)
    if quantization == "int8":  # LLM.int8 rounds the activations too, which no float model reproduces; merge_run
        tolerance = max(tolerance, INT8_TOLERANCE * scale)  # compared strictly with the dequantized adapter model
    if not diff <= tolerance:
        raise AssertionError(f"the merged checkpoint, loaded with plain transformers, gives outputs up to {diff:.3g} "
                             f"away from the trained model's (tolerance {tolerance:.3g}); merge does not fold in "
                             "every trained weight")
    merged_from = f" (dequantized from {quantization})" if quantization != "none" else ""
    return (f"merged{merged_from} and reloaded with plain {type(merged).__name__}: outputs reproduced (max "
            f"difference {diff:.1e}); {', '.join(result.files)}")


@check("memory-estimate", each="strategy",
       doc="estimate_memory (if defined) declares as many trainable parameters as apply leaves, and the plan's "
           f"peak is within {100 * MEMORY_TOLERANCE:.0f}% of the CPU's measured peak")
def memory_estimate(h: Harness) -> str:
    from ..bench import ProfilerUnavailable, cpu_peak_tensor_bytes
    from ..plan import RunShape, StrategyMemory, estimate, model_shape, strategy_memory

    if not isinstance(h.strategy, EstimatesMemory):
        raise Skip("no estimate_memory hook")
    if h.device.type != "cpu":
        raise Skip("measured on the CPU only")
    task = next((t for t in h.tasks if t in h.strategy.supported_tasks), None)
    quantization = h.preferred_quantization() if task else None
    if quantization is None:
        raise Skip("no declared task and quantization among those checked")
    shape = model_shape(h.model, task, "cpu", num_labels=len(LABELS))
    run = h.resolve(task, quantization, batch_size=MEMORY_BATCH[0], seq_len=MEMORY_BATCH[1])
    run_shape = RunShape(*MEMORY_BATCH, task, quantization, False, "cpu")
    part = strategy_memory(h.strategy, shape, run.config, run_shape)
    if part is None:
        raise Skip("estimate_memory gives no estimate for the default options")
    if not isinstance(part, StrategyMemory):
        raise AssertionError(f"estimate_memory returned {type(part).__name__}, not adapters.StrategyMemory")
    plan = estimate(shape, h.strategy, run.config, run_shape)

    session = h.open(run)
    trainable = session.parameters.trainable
    if part.trainable_parameters != trainable:
        raise AssertionError(f"estimate_memory says {part.trainable_parameters:,} trainable parameters, "
                             f"apply left {trainable:,}")
    batches = session.batches(Position(step=0, epoch=0, batch=0, tokens=0, seconds=0.0, losses=[]))
    session.stepper.step(next(batches), 1)  # the optimizer's state exists from the first step on
    second = next(batches)  # drawn before the profiler watches: the loader's rows are not the step's memory
    try:
        measured = cpu_peak_tensor_bytes(lambda: session.stepper.step(second, 2))
    except ProfilerUnavailable as exc:  # this torch cannot measure it; not the strategy's fault
        raise Skip(str(exc)) from None
    error = (plan.peak_bytes - measured) / measured
    detail = (f"{task}, {quantization}, batch {MEMORY_BATCH[0]} x {MEMORY_BATCH[1]}: predicted "
              f"{plan.peak_bytes / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB ({100 * error:+.1f}%)")
    if abs(error) > MEMORY_TOLERANCE:
        raise AssertionError(f"{detail}, beyond ±{100 * MEMORY_TOLERANCE:.0f}%")
    return detail


# The public listing, in report order: name -> what passing means.
DISTRIBUTED_STEPS = 3
# Two processes' gradients are averaged by an all-reduce, one process's summed by one backward: float32 sums in
# another order, a few ulps apart on the CPU.
DISTRIBUTED_TOLERANCE = 1e-4
_TWO_PROCESSES = """
import json, sys
from adapters import RunSpec, train
for sharding, output in json.loads(sys.argv[2]).items():
    result = train(RunSpec(**json.loads(sys.argv[1]), sharding=sharding, output=output), progress=False)
    assert result.status == "completed", result.reason
"""


@check("distributed", each="task", optional=True,
       doc=f"optional: 2 processes (torchrun, the CPU) with micro-batch 1 learn what 1 process with micro-batch 2 "
           f"learns, data parallel and sharded (--sharding fsdp, unquantized bases): the same losses and trained "
           f"weights over {DISTRIBUTED_STEPS} steps, within rtol {DISTRIBUTED_TOLERANCE:g}")
def distributed(h: Harness, task: str, quantization: str) -> str:
    import os
    import subprocess
    import sys

    from ..runspec import RunSpec
    from ..training import train

    if h.device.type != "cpu":
        raise Skip("runs on the CPU (gloo), where two processes share one machine")
    if h.registered_here:
        raise Skip("the processes torchrun starts find strategies by name: install the plugin to run this check")
    spec = dict(model=h.model, strategy=h.name, quantization=quantization, task=task, max_steps=DISTRIBUTED_STEPS,
                seq_len=32, eval_batches=1, log_every=1, seed=h.seed)
    shardings = ["none"] + (["fsdp"] if quantization == "none" else [])
    outputs = {sharding: str(h.workdir / f"distributed-{task}-{sharding}") for sharding in shardings}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(_script(h.workdir)),
         json.dumps({**spec, "batch_size": 1}), json.dumps(outputs)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise AssertionError(f"2 processes under torchrun failed: {done.stderr.strip().splitlines()[-1:]}")
    one = train(RunSpec(**spec, batch_size=2, output=str(h.workdir / f"distributed-{task}-one")), progress=False)
    expected = _weights(Path(one.output))
    lines = []
    for sharding, output in outputs.items():
        losses = [json.loads(line).get("loss") for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
        losses = [v for v in losses if v is not None]
        if not _close(losses, one.losses, DISTRIBUTED_TOLERANCE):
            raise AssertionError(f"--sharding {sharding}: 2 processes logged losses {losses}, 1 process {one.losses}")
        got = _weights(Path(output))
        if got.keys() != expected.keys():
            raise AssertionError(f"--sharding {sharding}: 2 processes saved other tensors: "
                                 f"{_names(got.keys() ^ expected.keys())}")
        diff = max(float((got[k].float() - expected[k].float()).abs().max()) for k in expected)
        scale = max(float(t.float().abs().max()) for t in expected.values())
        if diff > DISTRIBUTED_TOLERANCE * max(1.0, scale):
            raise AssertionError(f"--sharding {sharding}: the weights 2 processes saved differ by up to {diff:.3g} "
                                 "from 1 process's")
        lines.append(f"{'data parallel' if sharding == 'none' else 'FSDP'} (max difference {diff:.1e})")
    skipped = "" if "fsdp" in outputs else f"; FSDP not on a {quantization} base"
    return f"2 processes x 1 row = 1 process x 2 rows over {DISTRIBUTED_STEPS} steps: {', '.join(lines)}{skipped}"


def _script(workdir: Path) -> Path:
    path = workdir / "two_processes.py"
    path.write_text(_TWO_PROCESSES)
    return path


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from ..tensorfiles import read_safetensors

    return {f"{f.name}:{k}": v for f in sorted(run.glob("*.safetensors")) for k, v in read_safetensors(f).items()}


CHECKS: dict[str, str] = {c.name: c.doc for c in REGISTRY.values()}
OPTIONAL_CHECKS = frozenset(c.name for c in REGISTRY.values() if c.optional)  # run only when asked
# The checks that run for each declared (task, quantization); the capability matrix is made of them.
CELL_CHECKS = tuple(c.name for c in REGISTRY.values() if c.each == "cell")
