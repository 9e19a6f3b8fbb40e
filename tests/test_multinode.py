"""Several machines learn what one process learns. Two launcher invocations on this machine stand in for two machines:
`--nnodes 2 --node_rank 0|1` (torchrun) or `--num_machines 2 --machine_rank 0|1` (accelerate launch), rendezvous on
127.0.0.1, one process with micro-batch 1 on each node. Each node runs in a directory of its own, as on a machine of
its own; only the main process (rank 0, on node 0) writes the run. Its losses and final weights must be those of one
process with micro-batch 2 (gloo on the CPU), which one process with micro-batch 1 (a node left alone) does not give.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import assert_learned_the_same

STEPS = 3
RTOL, ATOL = 1e-4, 1e-6  # as test_distributed: an all-reduce sums float32 in another order than one backward
TIMEOUT = 240  # seconds for both nodes together
# LoRA with dropout 0: dropout draws its masks from each process's own random stream.
TRAIN = ["-m", "adapters", "train", "--model", "random:tiny", "--strategy", "lora", "--set", "dropout=0",
         "--max-steps", str(STEPS), "--seq-len", "32", "--eval-batches", "1", "--log-every", "1", "--output", "run"]
ENV = {**os.environ, "ADAPTERS_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}


def _torchrun(rank: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]


def _accelerate(rank: int, port: int) -> list[str]:
    # --multi_gpu picks Accelerate's torchrun launcher, which runs on CPUs too; --cpu would start one plain process
    # per machine, never joining the other (two separate runs, each exiting 0).
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(root: Path, launcher) -> Path:
    """Node 0 and node 1 started together, each in its own directory; the run node 0 saved."""
    port, procs, deadline = _free_port(), [], time.monotonic() + TIMEOUT
    nodes = [root / f"node{rank}" for rank in (0, 1)]
    try:
        for rank, node in enumerate(nodes):
            node.mkdir(parents=True)
            with (root / f"node{rank}.log").open("w") as log:  # the child keeps its own copy of the handle
                procs.append(subprocess.Popen(launcher(rank, port) + TRAIN + ["--batch-size", "1"], cwd=node,
                                              env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        # A node that failed leaves the other waiting for it at the rendezvous: stop at the first failure.
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
        assert codes == [0, 0], "\n".join(
            f"node {rank} {'still running' if code is None else f'exited {code}'}:\n"
            + (root / f"node{rank}.log").read_text()[-2000:] for rank, code in enumerate(codes) if code != 0)
    finally:  # a node that failed or hangs: both launchers and their workers go
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert not [p for p in nodes[1].rglob("*") if p.is_file()], "only the main process writes"
    return nodes[0] / "run"


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """One process with micro-batch 2: what two nodes with micro-batch 1 each must learn."""
    root = tmp_path_factory.mktemp("one")
    done = subprocess.run([sys.executable, *TRAIN, "--batch-size", "2"], cwd=root, env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run"


@pytest.mark.parametrize("launcher", [_torchrun, _accelerate], ids=["torchrun", "accelerate-launch"])
def test_two_nodes_learn_what_one_process_learns(tmp_path, one, launcher):
    two = _two_nodes(tmp_path, launcher)
    assert_learned_the_same(two, one, STEPS, RTOL, ATOL)
    assert json.loads((two / "adapters.json").read_text())["training"]["batch_size"] == 1
