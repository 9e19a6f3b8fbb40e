"""The conformance kit for strategy plugins: the checks behind `adapters check`, for a plugin's own tests.

Every check runs on tiny random models (``random:tiny``, a two-layer Llama, loaded for each task the
strategy declares and quantized each way it declares), on the CPU, in seconds::

    import adapters.testing

    def test_my_strategy_conforms():
        adapters.testing.assert_conforms("my-strategy")    # a registered name, or a strategy object

    # or one test per (task, quantization):
    @pytest.mark.parametrize("task, quantization", adapters.testing.cases(MyStrategy()))
    def test_my_strategy(task, quantization):
        adapters.testing.assert_conforms(MyStrategy(), tasks=[task], quantizations=[quantization])

`run_checks` returns a `CheckReport` (one `CheckResult` row per check, task and quantization);
`assert_conforms` raises `ConformanceError` (an AssertionError) with the failing rows. The
`register_plugin` fixture registers a plugin for one test and always unregisters it; load it with
``pytest_plugins = ["adapters.testing"]`` in a conftest.py, or ``from adapters.testing import
register_plugin`` there. `registered` is the same as a context manager.

The checks (`CHECKS`) are described in docs/plugins.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import AdaptersError
from .models import _quiet_transformers
from .contract import QUANTIZATIONS, TASKS, Strategy, declared_trainable, traits, validate_strategy
from .nn import ParameterCount, count_parameters
from .text import aligned_table

TINY_MODEL = "random:tiny"
LABELS = ["a", "b"]  # the labels of the tiny sequence-classification model
STEPS = 2  # optimizer steps per training run: LoRA's A matrices get their first gradient at step 2

PASS, FAIL, SKIP = "pass", "fail", "skip"
MEMORY_BATCH = (4, 128)  # the memory-estimate check's batch: large enough for activations to matter
MEMORY_TOLERANCE = 0.15  # the CPU target of the planner

# Every check, in the order a report lists them, with what it verifies.
CHECKS: dict[str, str] = {
    "declaration": "the name and the declaration satisfy the strategy contract",
    "config-defaults": "the config dataclass constructs from its defaults, through --set and a manifest's JSON",
    "apply": "apply returns a model with at least one trainable floating-point parameter, the same set "
             "on every apply under one seed, as many as expected_trainable_parameters declares (if defined) "
             "and as adapters.count_parameters counts",
    "train-step": f"after {STEPS} AdamW steps every trainable parameter changed and no frozen one did",
    "param-count": "trainable and total counts match a hand count, and under nf4/fp4/int8 equal the "
                   "unquantized model's (4-bit packing counted as the weights it holds)",
    "determinism": "two runs under one seed give identical losses and weights",
    "save-load": "adapters.save then adapters.load onto a freshly loaded base reproduces the outputs",
    "refused": "an undeclared quantization or task is refused up front, naming it",
    "gradient-checkpointing": "with checkpointing the loss and gradients equal those without it, or "
                              "--gradient-checkpointing is refused up front",
    "pipeline": "adapters train runs it by name for one step, saves, and adapters.load restores it",
    "memory-estimate": "estimate_memory (if defined) declares as many trainable parameters as apply leaves, and "
                       "the plan's peak is within 15% of the CPU's measured peak",
}
# The checks that run for each declared (task, quantization); the capability matrix is made of them.
CELL_CHECKS = ("apply", "train-step", "param-count", "determinism", "save-load")


@dataclass
class CheckResult:
    """One row of a report: a check, where it ran, and what it found."""

    check: str
    status: str  # "pass", "fail" or "skip"
    task: str | None = None
    quantization: str | None = None
    detail: str = ""


@dataclass
class CheckReport:
    """Every check's result for one strategy."""

    strategy: str
    plugin: str
    supported_quantization: list[str]
    supported_tasks: list[str]
    supports_gradient_checkpointing: bool
    options: dict[str, Any]  # the config's defaults, as JSON values
    description: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == FAIL]

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        counts = {s: sum(r.status == s for r in self.results) for s in (PASS, FAIL, SKIP)}
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"{self.strategy}: {verdict} ({counts[PASS]} passed, {counts[FAIL]} failed, "
                f"{counts[SKIP]} skipped)")

    def table(self, width: int = 110, failures_only: bool = False) -> str:
        """A plain-text table: check, task, quantization, result, detail."""
        rows = [r for r in self.results if r.status == FAIL or not failures_only]
        # A failure's detail is never cut short: it says what to fix.
        cells = [[r.check, r.task or "-", r.quantization or "-", r.status.upper() if r.status == FAIL else r.status,
                  r.detail if r.status == FAIL else _shorten(r.detail, width)] for r in rows]
        return aligned_table(cells, ["check", "task", "quantization", "result", "detail"])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passed"] = self.passed
        return data


class ConformanceError(AssertionError):
    """A strategy failed the conformance kit; the message is the table of failing rows."""

    def __init__(self, report: CheckReport) -> None:
        self.report = report
        super().__init__(f"{report.summary()}\n{report.table(width=400, failures_only=True)}")


def _shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


# --------------------------------------------------------------------------------------------
# Registering plugins for a test


def plugin_for(*strategies: Strategy) -> object:
    """A plugin object whose ``register_strategies`` hook registers ``strategies``."""
    from .host import hookimpl

    class StrategiesPlugin:
        @hookimpl
        def register_strategies(self, register):
            for strategy in strategies:
                register(strategy)

        def __repr__(self) -> str:
            return f"<plugin for {', '.join(getattr(s, 'name', '?') for s in strategies)}>"

    return StrategiesPlugin()


@contextlib.contextmanager
def registered(plugin: object, name: str | None = None, *, strict: bool = True) -> Iterator[str]:
    """Register ``plugin`` (a module or object with hook implementations) for the duration of a block.

    It is always unregistered afterwards. A misspelled or wrong-signature hook is rejected at once
    with an `AdaptersError` naming the plugin. With ``strict`` (the default) a failure in its
    ``register_strategies`` raises, as under ADAPTERS_STRICT_PLUGINS=1, instead of being skipped
    with a warning; pass ``strict=False`` to test the isolation of a broken plugin.
    """
    from .host import manager as plugins

    pm = plugins.get_plugin_manager()
    plugin_name = plugins.register_checked(pm, plugin, name=name)
    if strict:
        plugins._strict_plugins.add(plugin_name)
    try:
        yield plugin_name
    finally:
        plugins._strict_plugins.discard(plugin_name)
        if pm.get_plugin(plugin_name) is not None:
            pm.unregister(name=plugin_name)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixture
    pytest = None

if pytest is not None:

    @pytest.fixture
    def register_plugin():
        """``register_plugin(plugin, name=None, strict=True)``: register a plugin for one test.

        Every plugin registered through it is unregistered when the test ends, whatever happens.
        """
        with contextlib.ExitStack() as stack:

            def register(plugin: object, name: str | None = None, strict: bool = True) -> object:
                stack.enter_context(registered(plugin, name, strict=strict))
                return plugin

            yield register


# --------------------------------------------------------------------------------------------
# The checks


class _Skip(Exception):
    pass


@dataclass
class _Trained:
    base: Any  # BaseModel
    model: torch.nn.Module
    config: Any
    names: list[str]  # trainable parameter names
    before: dict[str, torch.Tensor]  # trainable parameters right after apply
    frozen: dict[str, torch.Tensor]  # frozen parameters right after apply
    count: ParameterCount
    declared: int | None  # expected_trainable_parameters(base model, config), when the strategy defines it
    losses: list[float]
    grads: dict[str, torch.Tensor | None]  # gradients of the first step


def _seed(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


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


class _Runner:
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
        self.results: list[CheckResult] = []
        self._runs: dict[tuple, _Trained | Exception] = {}
        self._reported: set[tuple] = set()
        self.applied_badly: set[tuple] = set()  # (task, quantization) whose apply check failed
        self._exact = self.device.type == "cpu"

    # -- plumbing --

    def check(self, name: str, task: str | None, quantization: str | None, fn, *args) -> None:
        try:
            if (task, quantization) in self.applied_badly:
                raise _Skip("the apply check failed")
            detail = fn(*args) or ""
            status = PASS
        except _Skip as skip:
            status, detail = SKIP, str(skip)
        except AssertionError as exc:
            status, detail = FAIL, str(exc) or "assertion failed"
        except Exception as exc:  # noqa: BLE001 - a check reports every error as a failure
            status, detail = FAIL, f"{type(exc).__name__}: {exc}"
        self.results.append(CheckResult(name, status, task, quantization, " ".join(str(detail).split())))

    def labels(self, task: str) -> list[str] | None:
        return LABELS if task == "sequence-classification" else None

    def load_base(self, task: str, quantization: str):
        from .models import load_base_model

        return load_base_model(self.model, quantization, task, self.labels(task), self.device)

    def batch(self, base, shape: tuple[int, int] = (2, 16)) -> dict[str, torch.Tensor]:
        vocab = base.model.config.vocab_size
        generator = torch.Generator().manual_seed(1234)
        ids = torch.randint(3, min(vocab, 259), shape, generator=generator).to(self.device)
        if base.task == "causal-lm":
            return {"input_ids": ids, "labels": ids}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.arange(shape[0], device=self.device) % len(LABELS)}

    def train(self, task: str, quantization: str, checkpointing: bool = False) -> _Trained:
        from .train import enable_gradient_checkpointing

        _seed(self.seed)
        base = self.load_base(task, quantization)
        if checkpointing:
            enable_gradient_checkpointing(base.model)
        config = self.strategy.config_class()
        declared = declared_trainable(self.strategy, base.model, config)
        model = self.strategy.apply(base.model, config)
        if not isinstance(model, torch.nn.Module):
            raise AssertionError(f"apply returned {type(model).__name__}, not a torch.nn.Module")
        params = dict(model.named_parameters())
        trainable = {n: p for n, p in params.items() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in trainable.items()}
        frozen = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
        count = count_parameters(model)
        losses: list[float] = []
        grads: dict[str, torch.Tensor | None] = {}
        if trainable:
            lr = traits(self.strategy).default_learning_rate
            optimizer = torch.optim.AdamW(list(trainable.values()), lr=lr, weight_decay=0.0)
            batch = self.batch(base)
            model.train()
            for step in range(STEPS):
                _seed(self.seed + 1 + step)  # the same dropout masks in every run
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise AssertionError(f"the loss is {loss.item()} at step {step + 1}")
                loss.backward()
                if step == 0:
                    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in trainable.items()}
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
        return _Trained(base, model, config, list(trainable), before, frozen, count, declared, losses, grads)

    def run(self, task: str, quantization: str, replica: int = 0) -> _Trained:
        """Run ``replica`` of the (task, quantization) training, once; a failure is re-raised every time."""
        key = (task, quantization, replica)
        if key not in self._runs:
            try:
                self._runs[key] = self.train(task, quantization)
            except Exception as exc:  # noqa: BLE001
                self._runs[key] = exc
        found = self._runs[key]
        if isinstance(found, Exception):
            if key not in self._reported:  # the first check that needs the run reports its failure
                self._reported.add(key)
                raise found
            raise _Skip(f"apply or training failed: {type(found).__name__}: {found}")
        return found

    def preferred_quantization(self, task: str) -> str | None:
        declared = [q for q in self.quantizations if q in self.strategy.supported_quantization]
        for q in ("none", traits(self.strategy).default_quantization):
            if q in declared:
                return q
        return declared[0] if declared else None

    def resolve(self, **settings: Any):
        from .runspec import RunSpec as TrainSettings
        from .runspec import resolve

        return resolve(TrainSettings(model=self.model, strategy=self.name, max_steps=1, **settings))

    # -- checks that run once --

    def declaration(self) -> str:
        problems = validate_strategy(self.strategy)
        if problems:
            raise AssertionError("; ".join(problems))
        if not isinstance(self.strategy, Strategy):
            raise AssertionError("does not satisfy the adapters.Strategy protocol")
        return (f"quantization: {', '.join(sorted(self.strategy.supported_quantization))}; "
                f"tasks: {', '.join(sorted(self.strategy.supported_tasks))}")

    def config_defaults(self) -> str:
        from .options import build_config, describe_options

        config = self.strategy.config_class()
        if build_config(self.strategy.config_class, {}, self.name) != config:
            raise AssertionError("build_config with no options differs from config_class()")
        values = dataclasses.asdict(config)
        try:
            text = json.dumps(values, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise AssertionError(f"the defaults {values!r} are not JSON, so no manifest can hold them: {exc}") from None
        restored = build_config(self.strategy.config_class, json.loads(text), self.name)
        if restored != config:
            raise AssertionError(f"the defaults do not survive the manifest's JSON: {restored!r} != {config!r}")
        describe_options(self.strategy.config_class)
        return " ".join(f"{k}={v}" for k, v in values.items()) or "no options"

    def memory_estimate(self) -> str:
        from .bench import cpu_peak_tensor_bytes
        from .plan import RunShape, StrategyMemory, estimate, model_shape, strategy_memory

        if not callable(getattr(self.strategy, "estimate_memory", None)):
            raise _Skip("no estimate_memory hook")
        if self.device.type != "cpu":
            raise _Skip("measured on the CPU only")
        task = next((t for t in self.tasks if t in self.strategy.supported_tasks), None)
        quantization = self.preferred_quantization(task) if task else None
        if quantization is None:
            raise _Skip("no declared task and quantization among those checked")
        shape = model_shape(self.model, task, "cpu", num_labels=len(LABELS))
        run = RunShape(MEMORY_BATCH[0], MEMORY_BATCH[1], task, quantization, False, "cpu")
        config = self.strategy.config_class()
        part = strategy_memory(self.strategy, shape, config, run)
        if part is None:
            raise _Skip("estimate_memory gives no estimate for the default options")
        if not isinstance(part, StrategyMemory):
            raise AssertionError(f"estimate_memory returned {type(part).__name__}, not adapters.StrategyMemory")
        plan = estimate(shape, self.strategy, config, run)

        _seed(self.seed)
        base = self.load_base(task, quantization)
        base.model.config.use_cache = False  # as adapters train and bench run it
        model = self.strategy.apply(base.model, config)
        trainable = count_parameters(model).trainable
        if part.trainable_parameters != trainable:
            raise AssertionError(f"estimate_memory says {part.trainable_parameters:,} trainable parameters, "
                                 f"apply left {trainable:,}")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batch = self.batch(base, MEMORY_BATCH)
        model.train()

        def step() -> None:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # the optimizer's state exists from the first step on
        measured = cpu_peak_tensor_bytes(step)
        error = (plan.peak_bytes - measured) / measured
        detail = (f"{task}, {quantization}, batch {MEMORY_BATCH[0]} x {MEMORY_BATCH[1]}: predicted "
                  f"{plan.peak_bytes / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB ({100 * error:+.1f}%)")
        if abs(error) > MEMORY_TOLERANCE:
            raise AssertionError(f"{detail}, beyond ±{100 * MEMORY_TOLERANCE:.0f}%")
        return detail

    # -- checks for each declared (task, quantization) --

    def apply(self, task: str, quantization: str) -> str:
        run = self.run(task, quantization)
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
        again = self.run(task, quantization, replica=1)
        if set(again.names) != set(run.names):
            extra, missing = sorted(set(again.names) - set(run.names)), sorted(set(run.names) - set(again.names))
            raise AssertionError(f"a second apply under the same seed leaves other parameters trainable: "
                                 f"+{_names(extra)} -{_names(missing)}")
        declared = "" if run.declared is None else ", as declared"
        return f"{len(run.names)} trainable tensors, {hand:,} of {run.count.total:,} parameters{declared}"

    def train_step(self, task: str, quantization: str) -> str:
        run = self.run(task, quantization)
        if not run.names:
            raise _Skip("nothing is trainable")
        params = dict(run.model.named_parameters())
        unchanged = [n for n in run.names if torch.equal(params[n].detach(), run.before[n])]
        if unchanged:
            raise AssertionError(f"{len(unchanged)} of {len(run.names)} trainable tensors did not change after "
                                 f"{STEPS} steps (no gradient reaches them?): {_names(unchanged)}")
        moved = [n for n, before in run.frozen.items() if not torch.equal(params[n].detach(), before)]
        if moved:
            raise AssertionError(f"{len(moved)} frozen tensors changed during training: {_names(moved)}")
        return f"loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f}; {len(run.frozen)} frozen tensors unchanged"

    def param_count(self, task: str, quantization: str) -> str:
        run = self.run(task, quantization)
        params = list(run.model.parameters())
        hand_trainable = sum(p.numel() for p in params if p.requires_grad)
        if run.count.trainable != hand_trainable:
            raise AssertionError(f"count_parameters says {run.count.trainable:,} trainable, a hand count "
                                 f"{hand_trainable:,}")
        if quantization == "none":
            hand_total = sum(p.numel() for p in params)
            if run.count.total != hand_total:
                raise AssertionError(f"count_parameters says {run.count.total:,} in all, a hand count {hand_total:,}")
            return f"{run.count.trainable:,} trainable of {run.count.total:,}"
        reference = self.reference_count(task)
        if (run.count.trainable, run.count.total) != (reference.trainable, reference.total):
            raise AssertionError(
                f"under {quantization}: {run.count.trainable:,} trainable of {run.count.total:,}; unquantized: "
                f"{reference.trainable:,} of {reference.total:,}"
            )
        stored = sum(p.numel() for p in params)
        packed = f" ({stored:,} stored elements)" if stored != run.count.total else ""
        return f"{run.count.trainable:,} trainable of {run.count.total:,}{packed}, as unquantized"

    def reference_count(self, task: str) -> ParameterCount:
        if "none" in self.quantizations and "none" in self.strategy.supported_quantization:
            return self.run(task, "none").count
        try:
            _seed(self.seed)
            base = self.load_base(task, "none")
            return count_parameters(self.strategy.apply(base.model, self.strategy.config_class()))
        except Exception as exc:  # noqa: BLE001
            raise _Skip(f"no unquantized model to compare with: {type(exc).__name__}: {exc}") from None

    def determinism(self, task: str, quantization: str) -> str:
        first, second = self.run(task, quantization), self.run(task, quantization, replica=1)
        if not self._close_lists(first.losses, second.losses):
            raise AssertionError(f"losses differ between two runs under one seed: {first.losses} vs {second.losses}")
        p1, p2 = dict(first.model.named_parameters()), dict(second.model.named_parameters())
        differ = [n for n in first.names if n in p2 and not self._same(p1[n].detach(), p2[n].detach())]
        if differ:
            raise AssertionError(f"trained weights differ between two runs under one seed: {_names(differ)}")
        return f"identical losses and weights over {STEPS} steps"

    def _same(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        if self._exact:
            return torch.equal(a, b)
        return torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5)

    def _close_lists(self, a: list[float], b: list[float]) -> bool:
        if self._exact:
            return a == b
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-5) for x, y in zip(a, b))

    def save_load(self, task: str, quantization: str) -> str:
        from .store import load, save

        run = self.run(task, quantization)
        model = run.model
        generator = torch.Generator().manual_seed(self.seed + 7)
        with torch.no_grad():  # move every trainable weight well away from its initial value
            for name in run.names:
                param = model.get_parameter(name)
                param.add_((0.05 * torch.randn(param.shape, generator=generator)).to(param.device, param.dtype))
        batch = self.batch(run.base)
        expected = _logits(model, batch)
        directory = save(model, self.workdir / f"save-{task}-{quantization}", strategy=self.strategy,
                         config=run.config, base=run.base)
        files = sorted(p.name for p in directory.iterdir())
        _seed(self.seed + 1000)  # as in a new process: anything left to chance comes out differently
        fresh = self.load_base(task, quantization)
        untouched = _logits(fresh.model, batch)
        if torch.allclose(expected, untouched, rtol=1e-5, atol=1e-6):
            raise AssertionError("the outputs did not change when every trainable weight did, so a round trip "
                                 "proves nothing; the trainable weights do not reach the outputs")
        loaded = load(directory, base=fresh)
        got = _logits(loaded.model, batch)
        if got.shape != expected.shape:
            raise AssertionError(f"outputs after loading have shape {tuple(got.shape)}, before saving "
                                 f"{tuple(expected.shape)}")
        diff = float((got - expected).abs().max())
        tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
        if self.device.type != "cpu":
            tolerance *= 100
        if not diff <= tolerance:
            raise AssertionError(f"outputs differ by up to {diff:.3g} after save -> load: the saved files "
                                 f"({', '.join(files)}) do not hold every trained weight, or load does not restore it")
        return f"outputs reproduced (max difference {diff:.1e}); saved {', '.join(files)}"

    def refused(self, task: str, quantization: str) -> str:
        undeclared = quantization if quantization not in self.strategy.supported_quantization else task
        try:
            self.resolve(quantization=quantization, task=task)
        except AdaptersError as exc:
            message = str(exc)
            if undeclared not in message or self.name not in message:
                raise AssertionError(f"refused, but the message names neither {self.name!r} nor {undeclared!r}: "
                                     f"{message}") from None
            return message
        raise AssertionError(f"{undeclared} is not declared, but adapters train accepted it")

    # -- checks for each declared task --

    def gradient_checkpointing(self, task: str, quantization: str) -> str:
        if not traits(self.strategy).supports_gradient_checkpointing:
            try:
                self.resolve(quantization=quantization, task=task, gradient_checkpointing=True)
            except AdaptersError as exc:
                return f"refused up front: {exc}"
            raise AssertionError("supports_gradient_checkpointing is False, but adapters train accepted "
                                 "--gradient-checkpointing")
        plain = self.run(task, quantization)
        checkpointed = self.train(task, quantization, checkpointing=True)
        if checkpointed.names != plain.names:
            raise AssertionError("with checkpointing, other parameters are trainable")
        if not math.isclose(checkpointed.losses[0], plain.losses[0], rel_tol=1e-4, abs_tol=1e-6):
            raise AssertionError(f"the loss with checkpointing is {checkpointed.losses[0]}, without "
                                 f"{plain.losses[0]}")
        wrong = []
        for name in plain.names:
            a, b = plain.grads.get(name), checkpointed.grads.get(name)
            if (a is None) != (b is None) or (a is not None and not torch.allclose(a, b, rtol=1e-3, atol=1e-6)):
                wrong.append(name)
        if wrong:
            raise AssertionError(f"gradients with checkpointing differ from those without: {_names(wrong)}")
        return "the same loss and gradients with checkpointing as without"

    def pipeline(self, task: str, quantization: str) -> str:
        from .store import load
        from .runspec import RunSpec as TrainSettings
        from .train import train

        out = self.workdir / f"pipeline-{task}"
        result = train(TrainSettings(model=self.model, strategy=self.name, quantization=quantization, task=task,
                                     max_steps=1, batch_size=2, seq_len=32, eval_batches=1, seed=self.seed,
                                     output=str(out)), progress=False)
        loaded = load(out)
        if loaded.strategy.name != self.name:
            raise AssertionError(f"adapters.load restored strategy {loaded.strategy.name!r}")
        return f"trained {result.parameters.trainable:,} parameters for 1 step, saved and reloaded"

    # -- all of them --

    def run_all(self) -> list[CheckResult]:
        self.check("declaration", None, None, self.declaration)
        if self.results[-1].status == FAIL:
            return self.results
        self.check("config-defaults", None, None, self.config_defaults)
        if self.results[-1].status == FAIL:
            return self.results
        for task in self.tasks:
            for quantization in self.quantizations:
                if task in self.strategy.supported_tasks and quantization in self.strategy.supported_quantization:
                    self.check("apply", task, quantization, self.apply, task, quantization)
                    if self.results[-1].status == FAIL:
                        self.applied_badly.add((task, quantization))
                    for name, fn in (("train-step", self.train_step), ("param-count", self.param_count),
                                     ("determinism", self.determinism), ("save-load", self.save_load)):
                        self.check(name, task, quantization, fn, task, quantization)
                    # Free the models; the gradient-checkpointing check compares with the first run
                    # on the preferred quantization, so that one stays.
                    self._runs.pop((task, quantization, 1), None)
                    if quantization != self.preferred_quantization(task):
                        self._runs.pop((task, quantization, 0), None)
                else:
                    self.check("refused", task, quantization, self.refused, task, quantization)
            if task in self.strategy.supported_tasks:
                quantization = self.preferred_quantization(task)
                if quantization is None:
                    continue
                self.check("gradient-checkpointing", task, quantization, self.gradient_checkpointing, task,
                           quantization)
                self.check("pipeline", task, quantization, self.pipeline, task, quantization)
        self.check("memory-estimate", None, None, self.memory_estimate)
        return self.results


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and lose a lot to them on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _resolve_strategy(strategy: str | Strategy) -> tuple[Strategy, str, bool]:
    """(strategy object, plugin name, whether it must be registered for the run)."""
    from .host import get_registry

    registry = get_registry()
    if isinstance(strategy, str):
        entry = registry.entry(strategy)
        return entry.strategy, entry.plugin, False
    name = getattr(strategy, "name", None)
    entry = registry.find(name) if isinstance(name, str) else None
    if entry is not None:
        # The same class registered already (the plugin under test is installed, too) is fine.
        if entry.strategy is not strategy and type(entry.strategy) is not type(strategy):
            raise AdaptersError(f"a different strategy named {name!r} is already registered by plugin "
                                f"{entry.plugin!r}; check that one by name, or rename this one.")
        return strategy, entry.plugin, False
    return strategy, f"adapters-testing-{name}", True


def _options(strategy: Strategy) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dataclasses.asdict(strategy.config_class()), allow_nan=False))
    except Exception:  # noqa: BLE001 - reported by the config-defaults check
        return {}


def run_checks(
    strategy: str | Strategy,
    *,
    quantizations: Iterable[str] | None = None,
    tasks: Iterable[str] | None = None,
    model: str = TINY_MODEL,
    seed: int = 0,
    device: str = "cpu",
) -> CheckReport:
    """Run every conformance check on ``strategy`` (a registered name, or a strategy object).

    ``quantizations`` and ``tasks`` narrow the run (default: all of them; those the strategy does
    not declare are checked for a clear refusal). A strategy object that is not registered is
    registered for the duration of the run. Nothing is cached between runs.
    """
    quantizations = list(quantizations) if quantizations is not None else list(QUANTIZATIONS)
    tasks = list(tasks) if tasks is not None else list(TASKS)
    for q in quantizations:
        if q not in QUANTIZATIONS:
            raise AdaptersError(f"unknown quantization {q!r}. Use one of: {', '.join(QUANTIZATIONS)}.")
    for t in tasks:
        if t not in TASKS:
            raise AdaptersError(f"unknown task {t!r}. Use one of: {', '.join(TASKS)}.")
    if not isinstance(strategy, str):
        problems = validate_strategy(strategy)
        if problems:  # it cannot even be registered; report the declaration and stop
            name = str(getattr(strategy, "name", type(strategy).__name__))
            return CheckReport(name, "-", [], [], False, {}, str(getattr(strategy, "description", "")),
                               [CheckResult("declaration", FAIL, detail="; ".join(problems))])
    obj, plugin, needs_registering = _resolve_strategy(strategy)
    report = CheckReport(
        obj.name, plugin, sorted(obj.supported_quantization), sorted(obj.supported_tasks),
        bool(traits(obj).supports_gradient_checkpointing), _options(obj), obj.description,
    )
    with contextlib.ExitStack() as stack:
        if needs_registering:
            stack.enter_context(registered(plugin_for(obj), name=plugin))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adapters-check-")))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # library chatter (PEFT, bitsandbytes) is not a result
        stack.enter_context(_quiet_transformers())
        stack.enter_context(_one_thread())
        runner = _Runner(obj, quantizations, tasks, model, seed, device, workdir)
        report.results = runner.run_all()
    return report


def assert_conforms(strategy: str | Strategy, **kwargs: Any) -> CheckReport:
    """`run_checks`, raising `ConformanceError` (an AssertionError listing the failing rows) on any failure."""
    report = run_checks(strategy, **kwargs)
    if not report.passed:
        raise ConformanceError(report)
    return report


def cases(strategy: str | Strategy) -> list[tuple[str, str]]:
    """Every (task, quantization) the strategy declares, for ``pytest.mark.parametrize``."""
    if isinstance(strategy, str):
        from .host import get_registry

        strategy = get_registry().get(strategy)
    return [(t, q) for t in TASKS if t in strategy.supported_tasks
            for q in QUANTIZATIONS if q in strategy.supported_quantization]
