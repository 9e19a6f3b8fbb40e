"""Running the command line from tests: in this process (fast) or in a fresh one (real exit codes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.cli import main as cli_main


def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """``adapters ARGS`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        cli_main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def run_captured(*args: str) -> subprocess.CompletedProcess:
    """``adapters ARGS`` in this process, its output captured without capsys (a module-scoped fixture has
    none); returned as `run_cli` returns a fresh process's."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        cli_main(list(args))
    return subprocess.CompletedProcess(["adapters", *args], info.value.code, out.getvalue(), err.getvalue())


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m adapters ARGS`` in a fresh process, with no third-party plugins."""
    env = {**os.environ, "ADAPTERS_LOAD_PLUGINS": ""}
    return subprocess.run([sys.executable, "-m", "adapters", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def assert_user_error(code: int, out: str, err: str, *needles: str) -> str:
    """Exit 2, and exactly one stderr line: ``Error: ...`` containing every needle; no traceback."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("Error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def bench_case_in_process(spec, measurement):
    """A bench worker's whole job (`adapters.bench.worker.work`: the case and its result as JSON, a failure
    recorded) in this process: the same measurement without a fresh interpreter's seconds of imports. The typed
    result, as `adapters.bench.worker.run_case` gives it back: patch it over ``adapters.bench.runner.run_case`` (and
    ``adapters.bench.capacity.run_case``)."""
    import gc
    import tempfile

    import msgspec

    from adapters.bench.worker import work
    from adapters.files import write_json
    from adapters.reports.model import Result

    with tempfile.TemporaryDirectory(prefix="adapters-bench-") as tmp:
        case, out = Path(tmp) / "case.json", Path(tmp) / "result.json"
        write_json(case, {"spec": spec.to_dict(), "measurement": measurement.to_dict()})
        assert work(str(case), str(out)) == 0
        result = msgspec.json.decode(out.read_bytes(), type=Result)
    gc.collect()  # the case's model and optimizer, before the next case loads its own
    return result
