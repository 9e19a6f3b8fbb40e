"""The conformance checks that run the whole pipeline: `adapters train` and its save, a resumed run, a merge, the
plan's memory estimate against a measured peak, and two processes against one. Declared after those of
`adapters.testing.checks`, so a report's rows follow the pipeline.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoints import Position
from ..contract import EstimatesMemory
from .checks import INT8_TOLERANCE, check, listed, logits, move_trained
from .harness import LABELS, Harness, Skip

MEMORY_BATCH = (4, 128)  # the memory-estimate check's batch: large enough for activations to matter
MEMORY_TOLERANCE = 0.15  # the CPU target of the planner


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
        raise AssertionError(f"the resumed run trains other parameters: {listed(expected.keys() ^ got.keys())}")
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
    move_trained(trained.model, trained.names, h.seed + 11)
    batch = h.batch(trained.run, trained.base)
    expected = logits(trained.model, batch)
    run = save(trained.model, h.workdir / f"merge-run-{task}", strategy=h.strategy, config=trained.run.config,
               base=trained.base, overwrite=True)
    result = merge_run(run, h.workdir / f"merged-{task}", dtype="fp32", overwrite=True, device=h.device)
    config = AutoConfig.from_pretrained(result.output).to_dict()
    if any(key in config for key in ("quantization_config", "auto_map")) or "peft" in json.dumps(config).lower():
        raise AssertionError("the merged checkpoint's config.json still names quantization, PEFT or remote code")
    merged = reload(result.output, task, h.device)
    diff = float((logits(merged, batch) - expected).abs().max())
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
    batches = session.batches(Position.start())
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
                                 f"{listed(got.keys() ^ expected.keys())}")
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
