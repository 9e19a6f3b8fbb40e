"""Checkpointing some of the layers: peak memory and speed against how many, with the plan beside each.

For each count of checkpointed layers (0: none; all: --gradient-checkpointing), one `adapters bench` of the same
strategy and workload, in its own process: tokens/s, the measured peak and the plan's prediction with its error.
The counts run in turn for ROUNDS rounds (the order reversed every other round), so that drifts in the machine's
speed hit them alike. Writes, per count, the medians over rounds and the ratios to no checkpointing: how much of
the saving of checkpointing every layer each count buys, and at what share of its cost in speed.

Usage: python benchmarks/checkpoint_layers.py [--model smollm2-135m] [--strategy lora] [--layers 0,10,20,29,all]
       [--batch-size 4 --seq-len 512] [--steps 2 --warmup 1] [--rounds 1]
       [--output benchmarks/results/checkpoint-layers-cpu-2core.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from adapters.bench.provenance import device_kind, provenance
from adapters.files import write_json

HERE = Path(__file__).resolve().parent


def bench(args: argparse.Namespace, layers: str) -> dict:
    """One `adapters bench` with ``layers`` checkpointed ("0", "all" or a count): speed, peak, plan."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bench.json"
        command = [sys.executable, "-m", "adapters", "bench", "--model", args.model, "--strategies", args.strategy,
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--output", str(report)]
        if layers == "all":
            command.append("--gradient-checkpointing")
        elif layers != "0":
            command += ["--checkpoint-layers", layers]
        out = subprocess.run(command, capture_output=True, text=True)
        if not report.exists():
            raise SystemExit(f"adapters bench ({layers} layers checkpointed) failed:\n{out.stderr[-3000:]}")
        result = json.loads(report.read_text())["results"][0]
    if result["status"] != "ok":
        raise SystemExit(f"adapters bench ({layers} layers checkpointed): {result['status']}: {result['message']}")
    prediction = result.get("prediction") or {}
    return {"tokens_per_s": result["tokens_per_s"], "peak_bytes": result["memory"]["peak_bytes"],
            "predicted_peak_bytes": prediction.get("peak_bytes"),
            "prediction_error_pct": (prediction.get("error_pct") or {}).get("total")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--strategy", default="lora")
    ap.add_argument("--layers", default="0,10,20,29,all", help="comma-separated counts; 0: none, all: every layer")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    counts = [c.strip() for c in args.layers.split(",") if c.strip()]
    if "0" not in counts:
        ap.error("--layers must include 0, the run every ratio is against")
    device = device_kind()
    name = f"cpu-{os.cpu_count()}core" if device == "cpu" else device
    output = Path(args.output or HERE / "results" / f"checkpoint-layers-{name}.json")
    report = {"what": "adapters bench with some of the decoder layers checkpointed (--checkpoint-layers), each count "
                      "in its own process, in turn; ratios are to no checkpointing",
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device, "provenance": provenance(),
              "settings": {"model": args.model, "strategy": args.strategy, "batch_size": args.batch_size,
                           "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
                           "rounds": args.rounds},
              "counts": {}}
    runs: dict[str, list[dict]] = {c: [] for c in counts}
    for i in range(args.rounds):
        for count in (counts if i % 2 == 0 else counts[::-1]):
            runs[count].append(bench(args, count))
            row = runs[count][-1]
            print(f"round {i + 1}, {count} layers checkpointed: {row['tokens_per_s']:.1f} tokens/s, peak "
                  f"{row['peak_bytes'] / 2**20:.0f} MiB (plan {row['prediction_error_pct']:+.1f}%)", flush=True)
    medians = {c: {k: statistics.median(r[k] for r in rows) for k in rows[0] if rows[0][k] is not None}
               for c, rows in runs.items()}
    none = medians["0"]
    every = medians.get("all")
    for count, m in medians.items():
        entry = {**m, "rounds": runs[count], "tokens_per_s_ratio": m["tokens_per_s"] / none["tokens_per_s"],
                 "peak_ratio": m["peak_bytes"] / none["peak_bytes"]}
        if every and every["peak_bytes"] < none["peak_bytes"]:  # the share of checkpointing every layer's saving
            entry["share_of_saving"] = (none["peak_bytes"] - m["peak_bytes"]) / (none["peak_bytes"]
                                                                                  - every["peak_bytes"])
        report["counts"][count] = entry
    write_json(output, report)
    for count, e in report["counts"].items():
        print(f"{count:>4} layers: {e['tokens_per_s_ratio']:.2f}x tokens/s, {e['peak_ratio']:.2f}x peak"
              + (f", {e['share_of_saving']:.0%} of every layer's saving" if "share_of_saving" in e else ""))
    print(f"-> {output}")


if __name__ == "__main__":
    main()
