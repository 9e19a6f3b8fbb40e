"""Start-up time of the light commands, in fresh interpreters: `adapters --help`, `compare`, `report`, `strategies`.

    python benchmarks/startup.py                      # this checkout
    python benchmarks/startup.py --tree /tmp/old      # another checkout (e.g. a git worktree of a release)

Each command runs ``--repeats`` times through ``adapters.cli.main`` with the tree (and its plugins/)
first on PYTHONPATH; the median wall time is printed, with the heavy modules the command imported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "results" / "cpu-2core-default-suite.json"
COMMANDS = {
    "--help": ["--help"],
    "compare A B": ["compare", str(REPORT), str(REPORT)],
    "report A --format markdown": ["report", str(REPORT), "--format", "markdown"],
    "strategies": ["strategies"],
}
PROBE = ("import sys\nfrom adapters.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
         "print('HEAVY', [m for m in ('torch', 'transformers', 'peft') if m in sys.modules], file=sys.stderr)")


def time_command(tree: Path, argv: list[str], repeats: int) -> tuple[float, list[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "plugins")]),
           "ADAPTERS_LOAD_PLUGINS": ""}
    times, heavy = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                              env=env, cwd=tree)
        times.append(time.perf_counter() - start)
        heavy = [line for line in proc.stderr.splitlines() if line.startswith("HEAVY")]
    return statistics.median(times), heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {}
    for label, argv in COMMANDS.items():
        seconds, heavy = time_command(args.tree.resolve(), argv, args.repeats)
        results[label] = {"median_s": round(seconds, 3), "imports": heavy[-1][6:] if heavy else "?"}
        print(f"adapters {label:28s} {seconds:6.2f} s   imports {results[label]['imports']}")
    print(json.dumps({"tree": str(args.tree), "repeats": args.repeats, "results": results}))


if __name__ == "__main__":
    main()
