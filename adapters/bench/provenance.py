"""What makes a report self-describing: the code, the command, the software and the machine."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the checkout, when adapters runs from one


def device_kind() -> str:
    """``"cuda"`` where a CUDA device is visible, else ``"cpu"``: where the cases run."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def benchmark_record(started: float) -> dict[str, Any]:
    """What a benchmark script records about its run besides its results: the seconds since ``started``
    (`time.perf_counter`), the date, the provenance, the threads and the load at the end (how quiet it was)."""
    import datetime
    import os
    import time

    import torch

    return {"seconds": round(time.perf_counter() - started, 1),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "provenance": provenance(), "threads": torch.get_num_threads(),
            "load_average_1m_at_end": os.getloadavg()[0]}


def provenance() -> dict[str, Any]:
    """The git commit and state, the command line, package and plugin versions, the CPU and the GPU."""
    import torch

    from ..host import distribution_of, get_registry
    from ..store import package_versions

    status = _git("status", "--porcelain")
    plugins = {}
    for entry in get_registry().entries():
        dist, version = distribution_of(entry.plugin)
        plugins[entry.strategy.name] = f"{dist} {version}"
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(), "memory_bytes": props.total_memory}
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "command": sys.argv,
        "versions": {**package_versions(), "torch_cuda": torch.version.cuda},
        "plugins": plugins,
        "python": platform.python_version(),
        "os": platform.platform(),
        "cpu": {"model": _cpu_model(), "cores": os.cpu_count()},
        "gpu": gpu,
    }


def _git(*args: str) -> str | None:
    """git's output in the checkout, or None outside one or without git."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
