"""The project's overhead against the plain stack, as a ratio measured in one run.

Alternates `adapters bench --strategies lora` and benchmarks/baseline/plain_lora.py on the same
checkpoint and workload, ROUNDS times each, so drifts in machine speed hit both alike, and writes
the step times and the median of the per-round ratios (adapters / plain) to a JSON file.

Usage: python benchmarks/overhead.py [--model smollm2-135m] [--rounds 3] [--output benchmarks/results/overhead-cpu.json]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from adapters.models import resolve_model
from adapters.store import write_json

HERE = Path(__file__).resolve().parent
ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--quantization", default="none", choices=["none", "nf4"])
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--output", default=str(HERE / "results" / "overhead-cpu.json"))
args = ap.parse_args()

checkpoint = resolve_model(args.model).locate()
spec = "lora" if args.quantization == "none" else f"lora@{args.quantization}"
project, plain = [], []
for round_ in range(args.rounds):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run([sys.executable, "-m", "adapters", "bench", "--model", args.model, "--strategies", spec,
                        "--batch-size", str(args.batch), "--seq-len", str(args.seq), "--steps", str(args.steps),
                        "--warmup", str(args.warmup), "--output", str(out)], check=True, capture_output=True)
        result = json.loads(out.read_text())["results"][0]
        project.append(result["step_s"]["median"])
    line = subprocess.run([sys.executable, str(HERE / "baseline" / "plain_lora.py"), str(checkpoint),
                           "--quantization", args.quantization, "--batch", str(args.batch), "--seq", str(args.seq),
                           "--steps", str(args.steps), "--warmup", str(args.warmup)],
                          check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    plain.append(json.loads(line)["step_s_median"])
    print(f"round {round_ + 1}: adapters {project[-1]:.3f} s/step, plain {plain[-1]:.3f} s/step", flush=True)

# Each round runs both back to back, so a per-round ratio cancels slow drifts of the machine;
# the median over rounds discards rounds disturbed by other work.
round_ratios = [a / b for a, b in zip(project, plain)]
ratio = statistics.median(round_ratios)
summary = {
    "what": f"{spec} step time, adapters bench / plain transformers+peft loop, same workload, alternating rounds",
    "model": args.model, "batch": args.batch, "seq_len": args.seq, "steps": args.steps, "warmup": args.warmup,
    "rounds": args.rounds, "adapters_step_s": project, "plain_step_s": plain,
    "round_ratios": round_ratios,
    "ratio": ratio,
    "ratio_of_medians": statistics.median(project) / statistics.median(plain),
    "ratio_of_minimums": min(project) / min(plain),
    "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                "gpu": None},
}
Path(args.output).parent.mkdir(parents=True, exist_ok=True)
write_json(Path(args.output), summary)
print(f"adapters/plain step time: {ratio:.3f}x  ->  {args.output}")
