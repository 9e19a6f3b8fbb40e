"""One case in a fresh Python process: starting it (`run_case`) and being it (`work`).

Each case runs in its own process, so peak memory and allocator state never bleed between cases,
and one that fails (out of memory, an error, a refusal) is recorded while the rest go on. The case
travels as JSON, ``{"spec": RunSpec.to_dict(), "measurement": Measurement.to_dict()}``, and the
result comes back as JSON too; the worker is ``python -m adapters.bench CASE.json RESULT.json``.

A case of several processes is one run started by torchrun (``python -m torch.distributed.run --standalone
--nproc_per_node N -m adapters.bench ...``), as `adapters train` runs there: each process measures its own part and
writes ``RESULT.json.RANK``, and `combine` makes them one result (each process's peak, the tokens of all of them).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from ..errors import AdaptersError, TrainingFailed
from ..files import write_json
from ..reports.model import Failed, OkResult, OutOfMemory, Refused, Result
from ..runspec import RunSpec
from .settings import Measurement


def run_case(spec: RunSpec, measurement: Measurement, processes: int | None = None) -> Result:
    """Measure ``spec`` in a fresh Python process, or in a fresh torchrun of ``processes`` (even of 1); its result,
    or the reason it failed."""
    with tempfile.TemporaryDirectory(prefix="adapters-bench-") as tmp:
        case, out = Path(tmp) / "case.json", Path(tmp) / "result.json"
        write_json(case, {"spec": spec.to_dict(), "measurement": measurement.to_dict()})
        # --standalone: a free port of its own, so that benches and runs on one machine never meet.
        launcher = [] if processes is None else ["-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", str(processes)]
        proc = subprocess.run([sys.executable, *launcher, "-m", "adapters.bench", str(case), str(out)],
                              capture_output=True, text=True)
        if processes is None and out.exists():
            return _read(out)
        ranks = [out.with_name(f"{out.name}.{rank}") for rank in range(processes or 0)]
        if ranks and all(r.exists() for r in ranks):
            return combine([_read(r) for r in ranks])
        failed = [r for r in (_read(r) for r in ranks if r.exists()) if not r.ok]
        if failed:
            return failed[0]
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return Failed(strategy=spec.strategy, message=f"worker exited with code {proc.returncode}: {' | '.join(tail)}")


def _read(path: Path) -> Result:
    return msgspec.json.decode(path.read_bytes(), type=Result)


def combine(ranks: list[Result]) -> Result:
    """One result from each process's (rank order): rank 0's, with the largest per-process peak (and its
    components), every process's peak, and the tokens of all processes per step and per second."""
    failed = [(rank, r) for rank, r in enumerate(ranks) if not r.ok]
    if failed:
        rank, result = failed[0]
        return msgspec.structs.replace(result, message=f"process {rank} of {len(ranks)}: {result.message}")
    peaks = [r.memory.peak_bytes for r in ranks]
    memory = msgspec.structs.replace(ranks[peaks.index(max(peaks))].memory, per_process_peak_bytes=peaks)
    return msgspec.structs.replace(ranks[0], memory=memory, processes=len(ranks),
                                   tokens_per_step=sum(r.tokens_per_step for r in ranks),
                                   tokens_per_s=sum(r.tokens_per_s for r in ranks),
                                   flags=sorted({f for r in ranks for f in r.flags}))


def work(case_path: str, out_path: str) -> int:
    """The worker process: measure the case in ``case_path`` and write its result, or its failure, to ``out_path``."""
    from .measure import measure

    case = json.loads(Path(case_path).read_text())
    spec = RunSpec(**case["spec"])
    rank = os.environ.get("RANK")  # set by torchrun: each process writes its own result
    out = Path(out_path) if rank is None else Path(f"{out_path}.{rank}")
    try:
        result = finite(measure(spec, Measurement(**case["measurement"])))
    except TrainingFailed as exc:  # a non-finite loss in the measured steps: the row failed
        result = Failed(strategy=spec.strategy, message=str(exc))
    except AdaptersError as exc:
        result = Refused(strategy=spec.strategy, message=str(exc))
    except Exception as exc:  # OOM and the like: recorded so the other strategies go on
        kind = OutOfMemory if "out of memory" in str(exc).lower() else Failed
        result = kind(strategy=spec.strategy, message=f"{type(exc).__name__}: {exc}"[:500])
    write_json(out, msgspec.to_builtins(result))
    # A process that failed exits with an error, so that torchrun stops the others, which would wait for it.
    return 0 if rank is None or result.ok else 1


# Where a non-finite number is only a missing extra: recorded as null, with a flag. Anywhere else
# (the loss, step times, memory) it means the measurement itself went wrong, and the row fails.
_EXTRAS = ("mfu", "energy_j_per_token", "prediction")


def finite(result: OkResult) -> Result:
    """``result`` as strict JSON holds it: every NaN or infinity becomes null, with a status that says so.

    In the held-out quality, the quality fails (its other numbers stay); in an extra (MFU, energy),
    the row gets a flag; anywhere else, the row is failed, naming each value and where it was.
    """
    found: list[tuple[str, float]] = []
    data = null_non_finite(msgspec.to_builtins(result), "", found)
    if not found:
        return result
    where = {path: f"{path} = {value}" for path, value in found}
    core = [text for path, text in where.items() if _top(path) not in ("quality", *_EXTRAS)]
    if core:
        return Failed(strategy=result.strategy,
                      message=f"non-finite {', '.join(core)} in the measurement (recorded as failed)")
    quality = [text for path, text in where.items() if _top(path) == "quality"]
    if quality:
        data["quality"].update(status="failed", message=f"non-finite {', '.join(quality)}")
    data["flags"] = list(data.get("flags") or []) + [f"non-finite {text}, recorded as null" for text in where.values()]
    return msgspec.convert(data, OkResult)


def _top(path: str) -> str:
    return path.split(".")[0].split("[")[0]


def null_non_finite(value: Any, path: str = "", found: list[tuple[str, float]] | None = None) -> Any:
    """``value`` (JSON data) with non-finite floats replaced by None, each added to ``found`` with its path."""
    found = [] if found is None else found
    if isinstance(value, float) and not math.isfinite(value):
        found.append((path, value))
        return None
    if isinstance(value, dict):
        return {k: null_non_finite(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [null_non_finite(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value
