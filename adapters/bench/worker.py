"""One case in a fresh Python process: starting it (`run_case`) and being it (`work`).

Each case runs in its own process, so peak memory and allocator state never bleed between cases,
and one that fails (out of memory, an error, a refusal) is recorded while the rest go on. The case
travels as JSON, ``{"spec": RunSpec.to_dict(), "measurement": Measurement.to_dict()}``, and the
result comes back as JSON too; the worker is ``python -m adapters.bench CASE.json RESULT.json``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import AdaptersError, TrainingFailed
from ..files import write_json
from ..runspec import RunSpec
from .settings import Measurement


def run_case(spec: RunSpec, measurement: Measurement) -> dict[str, Any]:
    """Measure ``spec`` in a fresh Python process; its result, or the reason it failed."""
    with tempfile.TemporaryDirectory(prefix="adapters-bench-") as tmp:
        case, out = Path(tmp) / "case.json", Path(tmp) / "result.json"
        write_json(case, {"spec": spec.to_dict(), "measurement": measurement.to_dict()})
        proc = subprocess.run([sys.executable, "-m", "adapters.bench", str(case), str(out)],
                              capture_output=True, text=True)
        if out.exists():
            return json.loads(out.read_text())
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"strategy": spec.strategy, "status": "failed",
            "message": f"worker exited with code {proc.returncode}: {' | '.join(tail)}"}


def work(case_path: str, out_path: str) -> int:
    """The worker process: measure the case in ``case_path`` and write its result, or its failure, to ``out_path``."""
    from .measure import measure

    case = json.loads(Path(case_path).read_text())
    spec = RunSpec(**case["spec"])
    try:
        result = measure(spec, Measurement(**case["measurement"]))
    except TrainingFailed as exc:
        result = {"strategy": spec.strategy, "status": "failed", "message": str(exc)}
    except AdaptersError as exc:
        result = {"strategy": spec.strategy, "status": "refused", "message": str(exc)}
    except Exception as exc:  # OOM and the like: recorded so the other strategies go on
        oom = "out of memory" in str(exc).lower()
        result = {"strategy": spec.strategy, "status": "oom" if oom else "failed",
                  "message": f"{type(exc).__name__}: {exc}"[:500]}
    write_json(Path(out_path), result)
    return 0
