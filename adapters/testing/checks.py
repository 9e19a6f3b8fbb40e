"""The conformance checks, each declared once with `check`: its name, where it runs, what it verifies.

A check is a function of the `Harness` (and, but for those that run once, of a task and a
quantization) that returns a one-line detail when it passes, raises `AssertionError` saying what
is wrong when it fails, and raises `Skip` when it cannot run. The registry's order is the order of
a report's rows; `adapters.testing.runner` runs them.

This module declares the checks of the strategy itself and of each cell (task and quantization) on the
kit's own runs; `adapters.testing.end_to_end` declares those that run the whole pipeline after them, and
`adapters.testing.catalog` lists them all.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..contract import Strategy, traits, validate_strategy
from ..runspec import StrategyRefused
from .harness import STEPS, Harness, Skip

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
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    finally:
        model.train(was_training)


def listed(names: Iterable[str], limit: int = 4) -> str:
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
        raise AssertionError(f"non-floating-point parameters are left trainable: {listed(not_float)}")
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
                             f"+{listed(extra)} -{listed(missing)}")
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
                             f"{STEPS} steps (no gradient reaches them?): {listed(unchanged)}")
    moved = [n for n, before in run.frozen.items() if not torch.equal(params[n].detach(), before)]
    if moved:
        raise AssertionError(f"{len(moved)} frozen tensors changed during training: {listed(moved)}")
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
        f", but these ops have none: {listed(ops)}; otherwise" if ops else ", so") + \
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
                             f"{listed(differ)}; {setting}")
    compared = "bit for bit" if h.exact else "within a relative 1e-3"
    return f"the same losses and weights over {STEPS} steps, {compared}"


@check("save-load", each="cell",
       doc="adapters.save then adapters.load onto a freshly loaded base reproduces the outputs")
def save_load(h: Harness, task: str, quantization: str) -> str:
    from ..store import load, save

    trained = h.run(task, quantization)
    model = trained.model
    move_trained(model, trained.names, h.seed + 7)
    batch = h.batch(trained.run, trained.base)
    expected = logits(model, batch)
    directory = save(model, h.workdir / f"save-{task}-{quantization}", strategy=h.strategy,
                     config=trained.run.config, base=trained.base)
    files = ", ".join(sorted(p.name for p in directory.iterdir()))
    fresh = h.fresh_base(trained.run)
    if torch.allclose(expected, logits(fresh.model, batch), rtol=1e-5, atol=1e-6):
        raise AssertionError("the outputs did not change when every trainable weight did, so a round trip "
                             "proves nothing; the trainable weights do not reach the outputs")
    loaded = load(directory, base=fresh)
    got = logits(loaded.model, batch)
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


def move_trained(model: torch.nn.Module, names: list[str], seed: int) -> None:
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
    parts = [f"{label}: {listed(names)}" for label, names in (
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
        raise AssertionError(f"gradients with checkpointing differ from those without: {listed(wrong)}")
    return "the same loss and gradients with checkpointing as without"
