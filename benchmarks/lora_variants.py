"""LoRA's variants (the ``lora`` strategy's options): the planner's memory against the measured peak, and the speed
of each against plain LoRA, in one run.

Each variant is one ``adapters bench`` in its own process (bench measures each case in a worker process of its own,
as `adapters train` runs it), with the same model, batch, steps and seed: its CPU peak as bench measures it (the
profiler's live tensor bytes), the planner's prediction beside it, and its tokens per second, also as a ratio to
plain LoRA's (the first variant). EVA and CorDA initialise from the run's first batches, before the timed steps.

Usage: python benchmarks/lora_variants.py [--model smollm2-135m] [--batch-size 2 --seq-len 96] [--steps 3]
       [--variants lora,dora,rslora,pissa,lora-plus,olora]  (also eva, corda: slow on the CPU)
       [--output benchmarks/results/lora-variants-cpu-2core.json]
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
# name -> the --set options of the lora strategy that make it
VARIANTS = {
    "lora": [],
    "dora": ["use_dora=true"],
    "rslora": ["use_rslora=true"],
    "pissa": ["init=pissa"],
    "lora-plus": ["lora_plus_ratio=16"],
    "olora": ["init=olora"],
    "eva": ["init=eva"],
    "corda": ["init=corda"],
}


def bench(args: argparse.Namespace, options: list[str], report: Path) -> dict:
    """One ``adapters bench`` of the lora strategy with ``options``, in a fresh process; its one result."""
    sets = [arg for option in options for arg in ("--set", option)]
    command = [sys.executable, "-m", "adapters", "bench", "--model", args.model, "--strategies", "lora", *sets,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--warmup", "1", "--output", str(report)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(report.read_text())["results"][0]
    if result["status"] != "ok":
        raise SystemExit(f"{' '.join(command)}: {result['status']}: {result.get('message')}")
    prediction = result.get("prediction") or {}
    return {"trainable_parameters": result["trainable_parameters"],
            "peak_bytes": result["memory"]["peak_bytes"], "source": result["memory"]["source"],
            "activations_bytes": result["memory"]["components"]["activations_and_temporaries"],
            "predicted_peak_bytes": prediction.get("peak_bytes"),
            "predicted_activations_bytes": (prediction.get("components") or {}).get("activations_and_temporaries"),
            "prediction_error_pct": (prediction.get("error_pct") or {}).get("total"),
            "tokens_per_s": result["tokens_per_s"], "step_s_median": result["step_s"]["median"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default="lora,dora,rslora,pissa,lora-plus,olora",
                    help=f"comma-separated, of {', '.join(VARIANTS)}; the first is the reference")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--output", default=str(HERE / "results" / "lora-variants-cpu-2core.json"))
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; use {', '.join(VARIANTS)}")

    report = {
        "what": "the lora strategy's variants: CPU peak memory measured by adapters bench against the plan, and "
                "tokens/s against the first variant's (plain LoRA)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance(),
        "settings": {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "steps": args.steps, "warmup": 1, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = {"variant": name, "options": VARIANTS[name],
                   **bench(args, VARIANTS[name], Path(tmp) / f"{name}.json")}
            reference = report["results"][0] if report["results"] else row
            row["tokens_per_s_ratio_to_lora"] = row["tokens_per_s"] / reference["tokens_per_s"]
            row["peak_ratio_to_lora"] = row["peak_bytes"] / reference["peak_bytes"]
            report["results"].append(row)
            print(json.dumps(row), flush=True)
            write_json(Path(args.output), report)  # after each row, so a run stopped part-way keeps them
    print(table(report["results"]))
    print(f"-> {args.output}")


def table(rows: list[dict]) -> str:
    """The results as the Markdown table docs/strategies.md shows."""
    lines = ["| variant | options | trainable | peak MiB | plan MiB (error) | tokens/s | vs LoRA |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        options = " ".join(f"`{o}`" for o in r["options"]) or "-"
        plan = (f"{r['predicted_peak_bytes'] / 2**20:,.0f} ({r['prediction_error_pct']:+.1f}%)"
                if r["predicted_peak_bytes"] else "-")
        lines.append(f"| {r['variant']} | {options} | {r['trainable_parameters']:,} | {r['peak_bytes'] / 2**20:,.0f} "
                     f"| {plan} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_ratio_to_lora']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
