"""LoRA's dropout: what it costs in memory and what it buys in quality, to choose the default by measurement.

PEFT's LoRA dropout keeps a dropped copy of each adapter's input for backward (seven per Llama layer: q, k, v,
o, gate, up, down), with its mask. For each dropout value (and seed), on the built-in instruction data and a
real model:

- quality: `adapters train --strategy lora --set dropout=P --data builtin:instructions` for STEPS steps, the
  held-out loss (completions only) before and after; every value trains with the same seed, so the same data
  order and initialisation, and differs only by the dropout;
- memory: `adapters bench --run` on that run (its strategy, options and data) at --memory-batch-size x
  --memory-seq-len: the step's CPU peak as bench measures it (the profiler's live tensor bytes), its
  activations, and the planner's prediction beside them.

Each command runs in its own process. Writes the numbers, with the differences against the first value.

Usage: python benchmarks/dropout.py [--model smollm2-135m] [--dropouts 0.05,0] [--seeds 0] [--steps 20]
       [--seq-len 128 --batch-size 4] [--memory-batch-size 4 --memory-seq-len 512]
       [--output benchmarks/results/dropout-cpu-2core.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from adapters.bench.provenance import provenance
from adapters.files import write_json

HERE = Path(__file__).resolve().parent


def adapters_cli(*args: str) -> str:
    """Run an adapters command in a fresh process; its stdout."""
    out = subprocess.run([sys.executable, "-m", "adapters", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"adapters {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def quality(args: argparse.Namespace, dropout: float, seed: int, output: Path) -> dict:
    result = json.loads(adapters_cli(
        "train", "--model", args.model, "--strategy", "lora", "--set", f"dropout={dropout}",
        "--data", "builtin:instructions", "--max-steps", str(args.steps), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--seed", str(seed), "--output", str(output), "--json"))
    return {"heldout_loss_before": result["heldout_before"]["loss"],
            "heldout_loss_after": result["heldout_after"]["loss"], "train_tokens_per_s": result["tokens_per_s"],
            "seconds": result["seconds"]}


def memory(args: argparse.Namespace, run: Path, report: Path) -> dict:
    adapters_cli("bench", "--run", str(run), "--batch-size", str(args.memory_batch_size),
                 "--seq-len", str(args.memory_seq_len), "--steps", "1", "--warmup", "1", "--output", str(report))
    result = json.loads(report.read_text())["results"][0]
    prediction = result.get("prediction") or {}
    return {"peak_bytes": result["memory"]["peak_bytes"], "source": result["memory"]["source"],
            "activations_bytes": result["memory"]["components"]["activations_and_temporaries"],
            "predicted_peak_bytes": prediction.get("peak_bytes"),
            "predicted_activations_bytes": (prediction.get("components") or {}).get("activations_and_temporaries"),
            "prediction_error_pct": (prediction.get("error_pct") or {}).get("total"),
            "tokens_per_s": result["tokens_per_s"]}


def compare(row: dict, reference: dict) -> dict:
    """``row`` with its differences against ``reference``, the first dropout's row with the same seed (or itself)."""
    row["heldout_loss_after_minus_reference"] = row["heldout_loss_after"] - reference["heldout_loss_after"]
    if "memory" in row and "memory" in reference:
        row["peak_ratio_to_reference"] = row["memory"]["peak_bytes"] / reference["memory"]["peak_bytes"]
        row["activations_ratio_to_reference"] = (row["memory"]["activations_bytes"]
                                                 / reference["memory"]["activations_bytes"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dropouts", default="0.05,0", help="comma-separated; the first is the reference")
    ap.add_argument("--seeds", default="0", help="comma-separated")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--memory-batch-size", type=int, default=4)
    ap.add_argument("--memory-seq-len", type=int, default=512)
    ap.add_argument("--output", default=str(HERE / "results" / "dropout-cpu-2core.json"))
    args = ap.parse_args()
    dropouts = [float(d) for d in args.dropouts.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    report = {
        "what": "LoRA dropout: CPU peak memory (adapters bench --run) and held-out loss after training "
                "(adapters train), on the built-in instruction data; differences against the first dropout",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance(),
        "settings": {"model": args.model, "data": "builtin:instructions", "dropouts": dropouts, "seeds": seeds,
                     "steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
                     "memory_batch_size": args.memory_batch_size, "memory_seq_len": args.memory_seq_len,
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for dropout in dropouts:
                run = Path(tmp) / f"lora-dropout{dropout}-seed{seed}"
                row = {"dropout": dropout, "seed": seed, **quality(args, dropout, seed, run)}
                if seed == seeds[0]:  # memory does not depend on the seed
                    row["memory"] = memory(args, run, Path(tmp) / f"bench-{dropout}.json")
                reference = next((r for r in report["results"] if r["seed"] == seed), row)
                report["results"].append(compare(row, reference))
                print(json.dumps(row), flush=True)
                write_json(Path(args.output), report)  # after each row, so a run stopped part-way keeps them
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
