"""One case in a fresh Python process: starting it (`run_case`) and being it (`work`).

Each case runs in its own process, so peak memory and allocator state never bleed between cases,
and one that fails (out of memory, an error, a refusal) is recorded while the rest go on. The case
travels as JSON, ``{"spec": RunSpec.to_dict(), "measurement": Measurement.to_dict()}``, and the
result comes back as JSON too; the worker is ``python -m adapters.bench CASE.json RESULT.json``.
"""
from __future__ import annotations

import json
import math
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
        result = finite(measure(spec, Measurement(**case["measurement"])))
    except TrainingFailed as exc:  # a non-finite loss in the measured steps: the loss is null, the row failed
        result = {"strategy": spec.strategy, "status": "failed", "message": str(exc), "final_loss": None}
    except AdaptersError as exc:
        result = {"strategy": spec.strategy, "status": "refused", "message": str(exc)}
    except Exception as exc:  # OOM and the like: recorded so the other strategies go on
        oom = "out of memory" in str(exc).lower()
        result = {"strategy": spec.strategy, "status": "oom" if oom else "failed",
                  "message": f"{type(exc).__name__}: {exc}"[:500]}
    write_json(Path(out_path), result)
    return 0


# Where a non-finite number is only a missing extra: recorded as null, with a flag. Anywhere else
# (the loss, step times, memory) it means the measurement itself went wrong, and the row fails.
_EXTRAS = ("mfu", "energy_j_per_token", "prediction")


def finite(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` as strict JSON holds it: every NaN or infinity becomes null, with a status that says so.

    In the held-out quality, the quality fails (its other numbers stay); in an extra (MFU, energy),
    the row gets a flag; anywhere else, the row is failed, naming each value and where it was.
    """
    found: list[tuple[str, float]] = []
    result = null_non_finite(result, "", found)
    if not found:
        return result
    where = {path: f"{path} = {value}" for path, value in found}
    core = [text for path, text in where.items() if _top(path) not in ("quality", *_EXTRAS)]
    if core:
        return {"strategy": result["strategy"], "status": "failed",
                "message": f"non-finite {', '.join(core)} in the measurement (recorded as failed)",
                "final_loss": result.get("final_loss")}
    quality = [text for path, text in where.items() if _top(path) == "quality"]
    if quality:
        result["quality"].update(status="failed", message=f"non-finite {', '.join(quality)}")
    flags = [f"non-finite {text}, recorded as null" for text in where.values()]
    result["flags"] = list(result.get("flags") or []) + flags
    return result


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
