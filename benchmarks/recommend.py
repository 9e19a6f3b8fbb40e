"""`adapters recommend`'s time against running every candidate fully, and whether its pick holds.

On the embedded SmolLM2 with the chat file of docs/data.md (78 conversations from the Python reference), runs
``adapters recommend --memory-limit 2GiB --budget-minutes 10`` twice, as a user would (the CLI, with --json), then
trains every candidate it measured fully (``adapters train``, FULL_STEPS steps, the same batch, the strategy's
own learning rate) and records:

- each recommend call's wall time and its whole result (the recommendation, or the candidates within noise, and
  every candidate's plan, measurements and reason);
- each full run's wall time and held-out loss after it;
- recommend's time as a share of the full runs' total, and whether the lowest held-out loss after the full runs
  is the recommended candidate's (or one within noise of it, by the 1% rule).

Usage: python benchmarks/recommend.py [--budget-minutes 10] [--memory-limit 2GiB] [--full-steps 60] [--calls 2]
       [--output benchmarks/results/recommend-cpu-2core.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adapters.bench.provenance import benchmark_record
from adapters.files import write_json

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"


def chat_file(path: Path) -> Path:
    """docs/data.md's chat file: a question about each topic of the Python reference, answered with its prose."""
    import pydoc_data.topics as t

    with open(path, "w") as f:
        for name, text in sorted(t.topics.items()):
            prose = [" ".join(p.split()) for p in text.split("\n\n")[1:] if len(p) > 80 and not p.startswith(" ")]
            if prose:
                f.write(json.dumps({"messages": [{"role": "user", "content": f"In Python, what is {name}?"},
                                                 {"role": "assistant", "content": prose[0]}]}) + "\n")
    return path


def adapters(*args: str) -> tuple[dict, float]:
    """Run the CLI with --json; its JSON and wall seconds."""
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "adapters", *args, "--json"], capture_output=True, text=True)
    took = time.monotonic() - began
    if proc.returncode != 0:
        raise SystemExit(f"adapters {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout), took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--memory-limit", default="2GiB")
    parser.add_argument("--full-steps", type=int, default=60)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--output", default=str(HERE / "results" / "recommend-cpu-2core.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recommend-bench-") as tmp:
        data = chat_file(Path(tmp) / "chat.jsonl")
        calls = []
        for i in range(args.calls):
            result, took = adapters("recommend", "--model", MODEL, "--data", str(data), "--memory-limit",
                                    args.memory_limit, "--budget-minutes", str(args.budget_minutes),
                                    "--output", f"{tmp}/recommend-{i}")
            calls.append({"seconds": round(took, 1), "within_budget": took <= 60 * args.budget_minutes,
                          "recommended": result["recommended"], "within_noise": result["within_noise"],
                          "result": {k: v for k, v in result.items() if k != "files"}})
            print(f"recommend call {i + 1}: {took:.0f} s, {result['recommended']}", file=sys.stderr)
        first = calls[0]["result"]["candidates"]
        measured = [c["name"] for c in first if c["status"] in ("recommended", "measured")]
        full = []
        for name in measured:
            c = next(c for c in first if c["name"] == name)
            summary, took = adapters("train", "--model", MODEL, "--data", str(data), "--strategy", name,
                                     "--max-steps", str(args.full_steps), "--memory-limit", args.memory_limit,
                                     "--output", f"{tmp}/full-{name}")
            full.append({"name": name, "seconds": round(took, 1), "heldout_after": summary["heldout_after"]["loss"],
                         "tokens": summary["tokens"], "recommend_loss_after": c["loss_after"]})
            print(f"full run {name}: {took:.0f} s, loss {summary['heldout_after']['loss']:.4f}", file=sys.stderr)
    best = min(full, key=lambda r: r["heldout_after"]) if full else None
    picked = [calls[0]["recommended"], *calls[0]["within_noise"]]  # the docs' example is the first call
    agrees = best is not None and (best["name"] in picked or any(
        r["name"] in picked and r["heldout_after"] <= best["heldout_after"] * 1.01 for r in full))
    total_full = sum(r["seconds"] for r in full)
    record = {
        **benchmark_record(started), "model": MODEL, "data": "docs/data.md's chat file (78 conversations)",
        "memory_limit": args.memory_limit, "budget_minutes": args.budget_minutes, "full_steps": args.full_steps,
        "calls": calls, "full_runs": full,
        "same_recommendation": len({c["recommended"] for c in calls}) == 1 or any(c["within_noise"] for c in calls),
        "recommend_seconds_vs_full": round(calls[0]["seconds"] / total_full, 3) if total_full else None,
        "full_runs_seconds": round(total_full, 1), "full_runs_best": best["name"] if best else None,
        "full_runs_agree": agrees,
    }
    write_json(Path(args.output), record)
    print(json.dumps({k: record[k] for k in ("same_recommendation", "recommend_seconds_vs_full",
                                             "full_runs_best", "full_runs_agree")}), file=sys.stderr)


if __name__ == "__main__":
    main()
