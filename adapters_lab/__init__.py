"""The launcher behind the `adapters` command of the adapters-lab distribution.

Our import package is called ``adapters``, and so is AdapterHub's library on PyPI. When both are
installed in one environment, one overwrites or shadows the other; the command then says so on one
line instead of failing with a traceback deep inside the other library. It imports nothing heavy.
"""
from __future__ import annotations

import sys

DISTRIBUTION = "adapters-lab"


def _foreign() -> str | None:
    """Why the importable ``adapters`` package is not ours, or None when it is."""
    import importlib.util

    spec = importlib.util.find_spec("adapters")
    if spec is None:
        return f"no `adapters` package is importable; reinstall {DISTRIBUTION}"
    try:
        import adapters
    except Exception as exc:  # someone else's package may fail in any way on import
        return f"importing `adapters` from {spec.origin} failed ({type(exc).__name__}: {exc})"
    if getattr(adapters, "__distribution__", None) != DISTRIBUTION:
        version = getattr(adapters, "__version__", "unknown version")
        return f"`adapters` at {spec.origin} is another library (AdapterHub's adapters {version}?)"
    return None


def main() -> None:
    problem = _foreign()
    if problem:
        print(
            f"Error: {problem}. AdapterHub's `adapters` and {DISTRIBUTION} both install an `adapters` package and "
            f"cannot share an environment: `pip uninstall adapters {DISTRIBUTION}`, then "
            f"`pip install {DISTRIBUTION}` (or use separate virtual environments).",
            file=sys.stderr,
        )
        sys.exit(2)
    from adapters.cli import main as cli_main

    cli_main()
