"""Benchmark strategies for memory and speed, each in a fresh subprocess, into a JSON report.

Modules, one job each:

* `settings`: `BenchSettings` (the suite) and `Measurement`; each strategy becomes a `RunSpec`.
* `runner`: `run_bench`, the suite: one fresh process per case, cancellation, the report.
* `worker`: one case's process, from both sides (``python -m adapters.bench CASE.json RESULT.json``).
* `measure`: what the worker does: timing, the memory breakdown, MFU, energy, quality.
* `profiler`: the CPU peak, from torch's private memory profiler, behind one checked function.
* `capacity`: the largest batch size or sequence length, by real runs.
* `predict`: the plan's prediction beside each measurement.
* `provenance`: the code, software and machine a report was made with.
* `table`: what the command line prints.

Only `measure` imports torch at import time; importing this package does not.
"""
from .capacity import find_capacity
from .profiler import ProfilerUnavailable, cpu_peak_tensor_bytes
from .runner import run_bench
from .settings import BenchSettings, Measurement, settings_from

__all__ = ["BenchSettings", "Measurement", "ProfilerUnavailable", "cpu_peak_tensor_bytes", "find_capacity",
           "run_bench", "settings_from"]
