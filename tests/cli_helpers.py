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
