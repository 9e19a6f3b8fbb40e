"""The kit's runs of a strategy: the core's own training session (`adapters.training.Session`) on a tiny model.

Each (task, quantization) cell is trained once (twice for the determinism check) when a check
first needs it, and the checks of the cell share those runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import string
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..batches import make_batches
from ..checkpoints import Position
from ..contract import Strategy, traits
from ..data import Dataset, Example
from ..loading import BaseModel
from ..nn import ParameterCount, count_parameters
from ..resolver import resolve
from ..runspec import Run, RunSpec
from ..training import Session, finite_loss, load_base

TINY_MODEL = "random:tiny"
LABELS = ["a", "b"]  # the labels of the tiny sequence-classification model
STEPS = 2  # optimizer steps per training run: LoRA's A matrices get their first gradient at step 2
BATCH = (2, 16)  # rows x tokens of a training batch


class Skip(Exception):
    """A check that cannot run here; its message says why."""


@dataclass
class Trained:
    """One training run of a cell, and what the checks compare with it."""

    run: Run
    base: BaseModel
    model: torch.nn.Module
    names: list[str]  # trainable parameter names
    before: dict[str, torch.Tensor]  # trainable parameters right after apply
    frozen: dict[str, torch.Tensor]  # frozen parameters right after apply
    count: ParameterCount
    declared: int | None  # expected_trainable_parameters(base model, config), when the strategy defines it
    losses: list[float]
    grads: dict[str, torch.Tensor | None]  # gradients of the first step
    # What torch warned has no deterministic implementation, while this run trained.
    nondeterministic_ops: list[str] = field(default_factory=list)


@contextlib.contextmanager
def reproducible() -> Iterator[None]:
    """One intra-op thread and deterministic algorithms for the block; every setting is restored afterwards.

    Split over threads, a reduction is summed in an order that depends on how many threads the machine
    grants at that moment, so a busy machine can change the last bits of a gradient. AdamW's first steps
    turn such a difference in a gradient near zero into a step of up to the learning rate, and the
    losses of two runs under one seed part. With one thread, deterministic algorithms (warn only: an op
    without a deterministic version warns, and the determinism check names it) and the deterministic
    modes of oneDNN and cuDNN, nothing is left to scheduling. Tiny models gain nothing from threads.
    """
    threads = torch.get_num_threads()
    algorithms = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    backends = (torch.backends.mkldnn.deterministic, torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.mkldnn.deterministic = True
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        (torch.backends.mkldnn.deterministic, torch.backends.cudnn.deterministic,
         torch.backends.cudnn.benchmark) = backends


def seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def kit_dataset(task: str) -> Dataset:
    """Eight rows of seeded random letters, labelled a, b, a, ... for classification.

    Every row is longer than any batch the kit builds, so no batch holds padding.
    """
    rng = random.Random(1234)
    texts = ["".join(rng.choice(string.ascii_lowercase + " ") for _ in range(400)) for _ in range(8)]
    labels = LABELS if task == "sequence-classification" else []
    examples = [Example(text, labels[i % len(labels)] if labels else None) for i, text in enumerate(texts)]
    return Dataset("adapters-check", examples, [], list(labels))


class Harness:
    """One strategy's runs on ``model``, for the checks: resolved, trained and cached per cell."""

    def __init__(self, strategy: Strategy, quantizations: list[str], tasks: list[str], model: str, seed: int,
                 device: str, workdir: Path) -> None:
        self.strategy = strategy
        self.name = strategy.name
        self.quantizations = quantizations
        self.tasks = tasks
        self.model = model
        self.seed = seed
        self.device = torch.device(device)
        self.workdir = workdir
        self.exact = self.device.type == "cpu"  # elsewhere kernels may differ in the last bits
        self.registered_here = False  # registered for this run only: other processes cannot find it by name
        self._runs: dict[tuple, Trained | Exception] = {}
        self._reported: set[tuple] = set()

    def resolve(self, task: str, quantization: str, **settings) -> Run:
        """The run ``adapters train`` makes of these settings (checked by `resolve`), on the kit's data.

        A refused combination raises `StrategyRefused` here, before anything is loaded. No weight decay: it would
        move a trainable weight that no gradient reaches, which the train-step check exists to catch.
        """
        settings = {"batch_size": BATCH[0], "seq_len": BATCH[1], "weight_decay": 0.0, **settings}
        spec = RunSpec(model=self.model, strategy=self.name, quantization=quantization, task=task, seed=self.seed,
                       max_steps=STEPS, **settings)
        run = resolve(spec, data=False)
        # The object under test, even where an equal one of its class is what is registered.
        return dataclasses.replace(run, strategy=self.strategy, dataset=kit_dataset(run.task))

    def batch(self, run: Run, base: BaseModel) -> dict[str, torch.Tensor]:
        """The run's first batch of its data, tokenized as `adapters train` tokenizes it."""
        data = make_batches(run.dataset.train, base, run.spec.seq_len, "train")
        return {k: v[: run.spec.batch_size].to(self.device) for k, v in data.tensors.items()}

    def fresh_base(self, run: Run) -> BaseModel:
        """The run's base loaded again under another seed: as in a new process, anything left to chance
        (a new classification head) comes out differently."""
        spec = dataclasses.replace(run.spec, seed=self.seed + 1000)
        return load_base(dataclasses.replace(run, spec=spec), self.device)

    def open(self, run: Run) -> Session:
        """``run``'s training session, as `adapters train` opens it."""
        session = Session.open(run)
        if not isinstance(session.built.model, torch.nn.Module):
            raise AssertionError(f"apply returned {type(session.built.model).__name__}, not a torch.nn.Module")
        return session

    def train(self, task: str, quantization: str, checkpointing: bool = False) -> Trained:
        """Apply the strategy in a training session and train it for `STEPS` of the session's steps."""
        run = self.resolve(task, quantization, gradient_checkpointing=checkpointing)
        session = self.open(run)
        model = session.built.model
        params = dict(model.named_parameters())
        trainable = {n: p for n, p in params.items() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in trainable.items()}
        frozen = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses, grads = self._steps(session, trainable)
        ops = sorted({str(w.message).split(" does not have a deterministic")[0] for w in caught
                      if "does not have a deterministic implementation" in str(w.message)})
        return Trained(run, session.base, model, list(trainable), before, frozen, session.parameters,
                       session.built.declared, losses, grads, ops)

    def _steps(self, session: Session, trainable: dict[str, torch.nn.Parameter]
               ) -> tuple[list[float], dict[str, torch.Tensor | None]]:
        grads: dict[str, torch.Tensor | None] = {}

        def keep_first_gradients(*_) -> None:  # the step clears them once it has stepped
            if not grads:
                grads.update({n: None if p.grad is None else p.grad.detach().clone() for n, p in trainable.items()})

        session.optimizer.optimizer.register_step_pre_hook(keep_first_gradients)
        batches = session.batches(Position.start())
        losses = []
        for step in range(1, STEPS + 1):
            seed_everything(self.seed + step)  # the same dropout masks in every run
            done = session.stepper.step(next(batches), step)
            if done is None:
                raise AssertionError(session.stepper.failure)
            losses.append(finite_loss(done[0].item(), step))
        return losses, grads

    def run(self, task: str, quantization: str, replica: int = 0) -> Trained:
        """Run ``replica`` of the (task, quantization) training, once; a failure is re-raised every time."""
        key = (task, quantization, replica)
        if key not in self._runs:
            try:
                self._runs[key] = self.train(task, quantization)
            except Exception as exc:  # noqa: BLE001 - re-raised to the checks that need the run
                self._runs[key] = exc
        found = self._runs[key]
        if isinstance(found, Exception):
            if key not in self._reported:  # the first check that needs the run reports its failure
                self._reported.add(key)
                raise found
            raise Skip(f"apply or training failed: {type(found).__name__}: {found}")
        return found

    def release(self, task: str, quantization: str, keep_first: bool = False) -> None:
        """Free a cell's runs (but its first, with ``keep_first``)."""
        self._runs.pop((task, quantization, 1), None)
        if not keep_first:
            self._runs.pop((task, quantization, 0), None)

    def reference_count(self, task: str, quantization: str) -> ParameterCount:
        """The strategy's counts on the unquantized base, to compare a quantized cell's with."""
        if "none" in self.quantizations and "none" in self.strategy.supported_quantization:
            return self.run(task, "none").count
        try:
            run = dataclasses.replace(self.resolve(task, quantization), quantization="none")
            return count_parameters(run.strategy.apply(load_base(run, self.device).model, run.config))
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"no unquantized model to compare with: {type(exc).__name__}: {exc}") from None

    def preferred_quantization(self) -> str | None:
        """The quantization the once-per-task checks run on: none, else the strategy's default, else any."""
        declared = [q for q in self.quantizations if q in self.strategy.supported_quantization]
        for q in ("none", traits(self.strategy).default_quantization):
            if q in declared:
                return q
        return declared[0] if declared else None

    def same(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        if self.exact:
            return torch.equal(a, b)
        return torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5)

    def same_losses(self, a: list[float], b: list[float]) -> bool:
        if self.exact:
            return a == b
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-5) for x, y in zip(a, b))
