"""The optimizer's share of full fine-tuning (issue 22): what each option saves in memory, costs in speed, and does
to the held-out loss, to choose the defaults by measurement.

Each option, one by one, against plain AdamW (the reference, the first row), on the same run: the built-in real
text, the same seed, no gradient clipping (the optimizer in backward has no total norm to clip to, so no row
clips), the strategy's own learning rate and schedule:

- adamw: torch's AdamW (fused on the CPU) over float32 master weights, stepped after backward;
- in-backward: ``--optimizer-in-backward``, each weight stepped in backward (exactly adamw's update);
- bf16, no masters: ``--master-weights none``, the model, gradients and AdamW's moments in bf16;
- bf16 + in-backward: both;
- adamw8bit: bitsandbytes' 8-bit AdamW (and with the optimizer in backward), where it runs;
- mixed: ``--mixed-precision bf16``, float32 masters under bf16 autocast (a GPU's default; an option on the CPU).

For each: quality, `adapters train` for --steps steps and its held-out loss (completions only, as train scores it)
after; memory and speed, `adapters bench` of the same run at --batch-size x --seq-len: the step's peak (on the CPU
the profiler's live tensor bytes; on CUDA max_memory_allocated), the plan's prediction beside it and its error, and
tokens/s of timed steps after a warm-up. Each command runs in its own process.

Usage: python benchmarks/optimizer_options.py [--model smollm2-135m] [--steps 10] [--batch-size 2] [--seq-len 64]
       [--options adamw,in-backward,bf16,bf16+in-backward,adamw8bit,adamw8bit+in-backward,mixed]
       [--output benchmarks/results/optimizer-options-cpu-2core.json]
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

# Each option's flags, added to the same run; the first is the reference.
OPTIONS = {
    "adamw": [],
    "in-backward": ["--optimizer-in-backward"],
    "bf16": ["--master-weights", "none"],
    "bf16+in-backward": ["--master-weights", "none", "--optimizer-in-backward"],
    "adamw8bit": ["--optimizer", "adamw8bit"],
    "adamw8bit+in-backward": ["--optimizer", "adamw8bit", "--optimizer-in-backward"],
    "paged_adamw8bit": ["--optimizer", "paged_adamw8bit"],  # CUDA: the states page to host memory under pressure
    "mixed": ["--mixed-precision", "bf16"],  # the CPU: the GPU's recipe, float32 masters under bf16 autocast
}
DEFAULT_OPTIONS = "adamw,in-backward,bf16,bf16+in-backward,adamw8bit,adamw8bit+in-backward"


def adapters_cli(*args: str) -> str:
    """Run an adapters command in a fresh process; its stdout."""
    out = subprocess.run([sys.executable, "-m", "adapters", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"adapters {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def run_flags(args: argparse.Namespace, flags: list[str]) -> list[str]:
    return ["--model", args.model, "--strategy", "full-finetune", "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), "--max-grad-norm", "0", "--seed", str(args.seed), *flags]


def quality(args: argparse.Namespace, flags: list[str], output: Path) -> dict:
    result = json.loads(adapters_cli("train", *run_flags(args, flags), "--max-steps", str(args.steps),
                                     "--log-every", "1", "--output", str(output), "--json"))
    return {"heldout_loss_before": result["heldout_before"]["loss"],
            "heldout_loss_after": result["heldout_after"]["loss"],
            "train_losses": [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()
                             if "loss" in json.loads(line)],
            "train_tokens_per_s": result["tokens_per_s"], "precision": result.get("precision")}


def memory(args: argparse.Namespace, flags: list[str], report: Path) -> dict:
    adapters_cli("bench", *[f.replace("--strategy", "--strategies") for f in run_flags(args, flags)],
                 "--steps", str(args.bench_steps), "--warmup", "1", "--output", str(report))
    result = json.loads(report.read_text())["results"][0]
    if result["status"] != "ok":
        return {"status": result["status"], "message": result.get("message")}
    prediction = result.get("prediction") or {}
    return {"peak_bytes": result["memory"]["peak_bytes"], "source": result["memory"]["source"],
            "components": result["memory"]["components"], "predicted_peak_bytes": prediction.get("peak_bytes"),
            "predicted_phase": prediction.get("phase"), "predicted_components": prediction.get("components"),
            "prediction_error_pct": (prediction.get("error_pct") or {}).get("total"),
            "tokens_per_s": result["tokens_per_s"], "step_s": result["step_s"]["median"]}


def compare(row: dict, reference: dict) -> dict:
    """``row`` with its ratios and differences against ``reference`` (the first option's row)."""
    row["heldout_loss_after_minus_reference"] = row["heldout_loss_after"] - reference["heldout_loss_after"]
    mine, theirs = row.get("memory", {}), reference.get("memory", {})
    if "peak_bytes" in mine and "peak_bytes" in theirs:
        row["peak_ratio_to_reference"] = mine["peak_bytes"] / theirs["peak_bytes"]
        row["tokens_per_s_ratio_to_reference"] = mine["tokens_per_s"] / theirs["tokens_per_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--options", default=DEFAULT_OPTIONS, help=f"comma-separated, of: {', '.join(OPTIONS)}; the "
                    "first is the reference")
    ap.add_argument("--steps", type=int, default=10, help="training steps for the held-out loss")
    ap.add_argument("--bench-steps", type=int, default=3, help="timed steps for memory and tokens/s")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(HERE / "results" / "optimizer-options-cpu-2core.json"))
    args = ap.parse_args()
    names = args.options.split(",")
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"--options: unknown {unknown[0]!r}; known: {', '.join(OPTIONS)}")

    report = {
        "what": "Full fine-tuning, the optimizer's options one by one: peak memory (adapters bench) with the plan's "
                "prediction, tokens/s, and the held-out loss after training (adapters train); ratios and "
                "differences against the first option",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance(),
        "settings": {"model": args.model, "strategy": "full-finetune", "data": "built-in (python-reference)",
                     "options": {n: OPTIONS[n] for n in names}, "steps": args.steps, "bench_steps": args.bench_steps,
                     "batch_size": args.batch_size, "seq_len": args.seq_len, "seed": args.seed,
                     "max_grad_norm": 0, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = {"option": name, "flags": OPTIONS[name], **quality(args, OPTIONS[name], Path(tmp) / name)}
            row["memory"] = memory(args, OPTIONS[name], Path(tmp) / f"bench-{name}.json")
            report["results"].append(compare(row, report["results"][0] if report["results"] else row))
            print(json.dumps({k: v for k, v in row.items() if k != "train_losses"}), flush=True)
            write_json(Path(args.output), report)  # after each row, so a run stopped part-way keeps them
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
