"""Data parallelism learns what one process learns: for every built-in strategy, 2 processes x micro-batch 1
give the losses and the final trainable weights of 1 process x micro-batch 2, with DDP and with FSDP
(`--sharding fsdp`: FSDP2 through Accelerate, on the CPU over gloo). A sharded run's save is an ordinary one:
the same files, reloaded by one process to the same logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import assert_learned_the_same, logged, saved_weights

import adapters
from adapters import RunSpec

# Built-in strategies (options that make a run deterministic across processes: dropout draws its masks from each
# process's own random stream, so LoRA runs with dropout 0 here).
STRATEGIES = {"lora": {"dropout": 0.0}, "prefix-tuning": {}, "linear-probe": {}, "full-finetune": {}}
STEPS = 3
# float32 sums in another order (a gradient all-reduce against one batch's backward): differences of a few ulps.
RTOL, ATOL = 1e-4, 1e-6
SHARDINGS = ("none", "fsdp")  # DDP, and FSDP2

# One torchrun (2 processes) for all of it, since each start costs seconds: every built-in with micro-batch 1, data
# parallel and sharded, into ROOT/two-SHARDING/NAME; then a sharded run stopped after step 2 (a checkpoint) and
# resumed to the end, into ROOT/resumed-fsdp/NAME.
TWO_PROCESSES = '''
import json, sys
import adapters
from adapters import RunSpec
from adapters.resuming import resume_spec
strategies, root, steps = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for sharding in ("none", "fsdp"):
    for name, options in strategies.items():
        adapters.train(RunSpec(model="random:tiny", strategy=name, options=options, batch_size=1, max_steps=steps,
                               seq_len=32, eval_batches=1, log_every=1, sharding=sharding,
                               output=f"{root}/two-{sharding}/{name}"), progress=False)
for name in ("full-finetune", "lora"):
    spec = RunSpec(model="random:tiny", strategy=name, options=strategies[name], batch_size=1, max_steps=steps,
                   seq_len=32, eval_batches=1, log_every=1, sharding="fsdp", output=f"{root}/resumed-fsdp/{name}")
    first = adapters.train(spec, progress=False, stop=lambda step: step == 2)
    assert first.status == "interrupted" and len(first.checkpoints) == 1 or not first.main_process, first
    assert adapters.train(resume_spec(spec.output, {}, {}), progress=False).status == "completed"
'''


def _spec(name: str, output: Path, batch_size: int) -> RunSpec:
    return RunSpec(model="random:tiny", strategy=name, options=STRATEGIES[name], batch_size=batch_size,
                   max_steps=STEPS, seq_len=32, eval_batches=1, log_every=1, output=str(output))


def _torchrun(root: Path) -> None:
    """`TWO_PROCESSES` run by 2 processes under torchrun on the CPU."""
    script = root / "script.py"
    script.write_text(TWO_PROCESSES)
    env = {**os.environ, "ADAPTERS_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           json.dumps(STRATEGIES), str(root), str(STEPS)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each built-in trained by 2 processes with micro-batch 1, with DDP and with FSDP, and by 1 with 2."""
    root = tmp_path_factory.mktemp("ddp")
    _torchrun(root)
    accelerate = Path(sys.executable).with_name("accelerate")  # its own FSDP flags instead of --sharding
    done = subprocess.run([str(accelerate), "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "adapters", "train",
                           "--model", "random:tiny", "--strategy", "full-finetune", "--batch-size", "1",
                           "--max-steps", str(STEPS), "--seq-len", "32", "--eval-batches", "1", "--log-every", "1",
                           "--output", str(root / "accelerate-fsdp")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ADAPTERS_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for name in STRATEGIES:
        result = adapters.train(_spec(name, root / "one" / name, 2), progress=False)
        assert result.status == "completed"
    return root


@pytest.mark.parametrize("sharding", SHARDINGS)
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_processes_learn_what_one_process_learns(runs, name, sharding):
    one, two = runs / "one" / name, runs / f"two-{sharding}" / name
    assert_learned_the_same(two, one, STEPS, RTOL, ATOL)
    assert json.loads((two / "adapters.json").read_text())["training"]["batch_size"] == 1


@pytest.mark.parametrize("name", ["full-finetune", "lora"])
def test_a_sharded_runs_save_reloads_in_one_process_to_the_same_logits(runs, name):
    one, two = runs / "one" / name, runs / "two-fsdp" / name
    assert sorted(p.name for p in two.iterdir() if p.suffix != ".jsonl") == \
        sorted(p.name for p in one.iterdir() if p.suffix != ".jsonl")  # the same files as one process's save
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        a, b = (adapters.load(run).model.eval()(input_ids=ids).logits for run in (one, two))
    torch.testing.assert_close(b, a, rtol=RTOL, atol=1e-5)
    manifest = json.loads((two / "adapters.json").read_text())["training"]
    assert manifest["sharding"] == "fsdp" and manifest["loss"] == "chunked(256)"  # inside the sharded forward


def test_sharding_a_quantized_base_is_refused_before_loading(capsys, tmp_path):
    from cli_helpers import assert_user_error, run_in_process

    code, out, err = run_in_process(capsys, "train", "--model", "random:tiny", "--strategy", "qlora", "--sharding",
                                    "fsdp", "--output", str(tmp_path / "out"))
    assert_user_error(code, out, err, "--sharding fsdp", "--quantization none")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["full-finetune", "lora"])
def test_a_sharded_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(runs, name):
    """Its checkpoint (the gathered weights, AdamW's whole state and the schedule's, all in safetensors and JSON)
    lets the run go on where it stopped: the same losses after the resume and the same final weights."""
    straight, resumed = runs / "two-fsdp" / name, runs / "resumed-fsdp" / name
    checkpoint = resumed / "checkpoints" / "step-2"
    assert {p.name for p in checkpoint.iterdir()} >= {"model", "optimizer.safetensors", "optimizer.json"}
    assert not [p for p in checkpoint.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]  # nothing pickled
    last = [torch.tensor(logged(run, "loss")[-1]) for run in (resumed, straight)]
    torch.testing.assert_close(*last, rtol=RTOL, atol=ATOL)  # the step after the resume
    a, b = saved_weights(straight), saved_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL, msg=key)


def test_the_kits_optional_distributed_check_runs_only_when_asked(tmp_path):
    """`adapters check STRATEGY --with distributed`: the same comparison, for any installed strategy."""
    from adapters.testing.end_to_end import distributed
    from adapters.testing.harness import TINY_MODEL, Harness
    from adapters.testing.runner import _Runner

    harness = Harness(adapters.get_strategy("lora"), ["none"], ["causal-lm"], TINY_MODEL, 0, "cpu", tmp_path)
    detail = distributed(harness, "causal-lm", "none")
    assert "data parallel" in detail and "FSDP" in detail
    assert "distributed" not in [c.name for c in _Runner(harness).checks]  # optional: not run unless asked
    assert "distributed" in [c.name for c in _Runner(harness, ["distributed"]).checks]


def test_accelerate_launch_use_fsdp_shards_as_sharding_fsdp_does(runs):
    """`accelerate launch --use_fsdp` on the CPU, where Accelerate alone would ignore it: the run is sharded."""
    two = runs / "accelerate-fsdp"
    assert json.loads((two / "adapters.json").read_text())["training"]["sharding"] == "fsdp"
    a, b = saved_weights(runs / "one" / "full-finetune"), saved_weights(two)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL, msg=key)


def test_ctrl_c_stops_every_process_of_a_sharded_run_after_the_same_step_with_a_checkpoint(tmp_path):
    """SIGINT to the whole process group, as Ctrl-C in a terminal sends it: each process gets it at its own moment
    of a step, yet all stop after the same one (they agree by an all-reduce) and write one checkpoint together,
    instead of one process waiting forever in a collective the other never joins."""
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "ADAPTERS_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "adapters", "train",
         "--model", "random:tiny", "--strategy", "full-finetune", "--batch-size", "1", "--max-steps", "100000",
         "--seq-len", "32", "--eval-batches", "1", "--log-every", "1", "--sharding", "fsdp", "--output", str(out)],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()[-2000:]
            time.sleep(0.1)
        os.killpg(launcher.pid, signal.SIGINT)
        said, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{last}"], err[-2000:]
    assert f"interrupted after step {last}" in said and f"adapters train --resume {out}" in said  # the main process
    assert {p.name for p in (out / "checkpoints" / f"step-{last}").iterdir()} >= {"model", "optimizer.safetensors"}


OOM_IN_ONE_PROCESS = '''
import os, sys
import torch
import adapters.training.step
from adapters.cli import main
if os.environ["RANK"] == "1":  # process 1 runs out of memory in its third step; process 0 never does
    step, calls = adapters.training.step.optimizer_step, []
    def tight(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(*args, **kwargs)
    adapters.training.step.optimizer_step = tight
main(sys.argv[1:])
'''


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_out_of_memory_in_one_process_stops_the_run_with_its_reason(tmp_path, sharding):
    """It cannot halve its micro-batch alone (the other is already in the step's collectives): it says why and exits,
    and torchrun ends the other; the checkpoint before it stays."""
    script = tmp_path / "oom.py"
    script.write_text(OOM_IN_ONE_PROCESS)
    out = tmp_path / "run"
    env = {**os.environ, "ADAPTERS_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), "train", "--model",
         "random:tiny", "--strategy", "full-finetune", "--batch-size", "2", "--max-steps", "5", "--seq-len", "32",
         "--eval-batches", "1", "--save-every", "1", "--sharding", sharding, "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "out of memory at step 3 in process 1 of 2" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr.split("out of memory at step 3")[0][-300:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1", "step-2"]
