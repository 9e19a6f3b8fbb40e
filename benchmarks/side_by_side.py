"""adapters beside the plain stack: tokens/s and peak memory of each, and their ratios, measured in one run.

For each case it runs the plain stack's recipe (baseline/plain_stack.py: transformers + peft + bitsandbytes,
a hand-written loop) and `adapters bench` on the same model and workload, each in its own subprocess, one
after the other, for ROUNDS rounds (the order flips every round), so that drifts in the machine's speed hit
both alike. Both measure peak memory the same way (CUDA's allocator peak; on the CPU the profiler's live
tensor bytes around one step). The cases:

  lora            adapters `lora`           beside PEFT LoRA (r16, dropout 0.05, all linear layers but the head)
  full-finetune   adapters `full-finetune`  beside full fine-tuning
  qlora           adapters `qlora`          beside the HF QLoRA recipe (prepare_model_for_kbit_training,
                                            its gradient checkpointing on, train mode)

``--memory-limit plain`` gives adapters the plain run's measured peak as its limit, round by round (the plain side
then runs first in every round): how fast adapters trains in the plain stack's memory, its plan choosing how.

The JSON holds, per case, each side's tokens/s and peak per round, the planner's prediction of adapters'
peak with its error, and the ratios adapters / plain (per round, and their median): a tokens/s ratio
above 1 and a peak ratio below 1 favour adapters. With the machine, the versions and the settings.

Usage: python benchmarks/side_by_side.py [--model smollm2-135m] [--batch-size 4 --seq-len 512]
       [--steps 3 --warmup 1] [--rounds 1] [--cases lora,full-finetune,qlora] [--loss-chunk N]
       [--compile/--no-compile] [--optimizer adamw|adamw8bit|paged_adamw8bit] [--master-weights fp32|none]
       [--optimizer-in-backward] [--gradient-checkpointing | --checkpoint-layers N] [--mixed-precision bf16|no]
       [--memory-limit SIZE|plain] [--output FILE (default: benchmarks/results/side-by-side-cpu-<cores>core.json)]
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

from adapters import rules
from adapters.bench.provenance import device_kind, provenance
from adapters.files import write_json

HERE = Path(__file__).resolve().parent
# case -> (adapters bench's strategy, the plain stack's variant)
CASES = {"lora": ("lora", "lora"), "full-finetune": ("full-finetune", "full"), "qlora": ("qlora", "qlora")}


def run_plain(variant: str, args: argparse.Namespace) -> dict:
    """One plain-stack measurement in a fresh process: its JSON line."""
    out = subprocess.run([sys.executable, str(HERE / "baseline" / "plain_stack.py"), "--variant", variant,
                          "--model", args.model, "--batch", str(args.batch_size), "--seq", str(args.seq_len),
                          "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"plain_stack.py --variant {variant} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"tokens_per_s": result["tokens_per_s"], "peak_bytes": result["peak_bytes"],
            "step_s": result["step_s"]["median"], "final_loss": result["final_loss"]}


def run_adapters(strategy: str, args: argparse.Namespace, limit: str | None = None) -> dict:
    """One `adapters bench` case (bench runs it in a fresh worker process): tokens/s, peak and prediction, and with
    a memory ``limit`` what its plan chose to fit it."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bench.json"
        command = [sys.executable, "-m", "adapters", "bench", "--model", args.model, "--strategies", strategy,
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--seed", str(args.seed), "--output", str(report)]
        if args.loss_chunk is not None:
            command += ["--loss-chunk", str(args.loss_chunk)]
        if args.compile is not None:
            command.append("--compile" if args.compile else "--no-compile")
        if args.optimizer is not None:
            command += ["--optimizer", args.optimizer]
        if args.master_weights is not None:
            command += ["--master-weights", args.master_weights]
        if args.optimizer_in_backward:
            command.append("--optimizer-in-backward")
        if args.gradient_checkpointing:
            command.append("--gradient-checkpointing")
        if args.checkpoint_layers is not None:
            command += ["--checkpoint-layers", str(args.checkpoint_layers)]
        if args.mixed_precision is not None:
            command += ["--mixed-precision", args.mixed_precision]
        if limit is not None:
            command += ["--memory-limit", limit]
        out = subprocess.run(command, capture_output=True, text=True)
        if not report.exists():
            raise SystemExit(f"adapters bench --strategies {strategy} failed:\n{out.stderr[-3000:]}")
        result = json.loads(report.read_text())["results"][0]
    if result["status"] != "ok":
        raise SystemExit(f"adapters bench --strategies {strategy}: {result['status']}: {result['message']}")
    prediction = result.get("prediction") or {}
    return {"tokens_per_s": result["tokens_per_s"], "peak_bytes": result["memory"]["peak_bytes"],
            "step_s": result["step_s"]["median"], "final_loss": result["final_loss"],
            "predicted_peak_bytes": prediction.get("peak_bytes"),
            "prediction_error_pct": (prediction.get("error_pct") or {}).get("total"),
            "flags": result["flags"], **{k: v for k, v in result.items() if k.startswith("compile")},
            **({"memory_limit": limit, "fit": result["memory_fit"]["reason"]} if result.get("memory_fit") else {})}


def summarize(rounds: list[dict]) -> dict:
    """Each side's numbers per round, and the ratios adapters / plain per round and their median."""
    sides = {side: {key: [r[side].get(key) for r in rounds] for key in rounds[0][side]}
             for side in ("plain", "adapters")}
    speed = [r["adapters"]["tokens_per_s"] / r["plain"]["tokens_per_s"] for r in rounds]
    memory = [r["adapters"]["peak_bytes"] / r["plain"]["peak_bytes"] for r in rounds]
    return {**sides, "ratios": {"tokens_per_s": statistics.median(speed), "peak_memory": statistics.median(memory),
                                "tokens_per_s_rounds": speed, "peak_memory_rounds": memory}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=1, help="plain/adapters pairs per case, the order flipped each round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--loss-chunk", type=int, default=None, help="passed to adapters bench")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="passed to adapters bench (default: its own)")
    ap.add_argument("--optimizer", default=None, help="passed to adapters bench: adamw, adamw8bit, "
                    "paged_adamw8bit (default: its own); the plain stack keeps torch's AdamW")
    ap.add_argument("--master-weights", choices=["fp32", "none"], default=None,
                    help="passed to adapters bench (default: its own, fp32); the plain stack keeps float32 weights")
    ap.add_argument("--optimizer-in-backward", action="store_true",
                    help="passed to adapters bench; the plain stack steps after backward")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="passed to adapters bench; the plain stack's QLoRA recipe checkpoints every layer anyway, "
                    "its LoRA and full fine-tuning never do")
    ap.add_argument("--checkpoint-layers", type=int, default=None,
                    help="passed to adapters bench: checkpoint its first N decoder layers alone")
    ap.add_argument("--mixed-precision", choices=rules.MIXED_PRECISION, default=None,
                    help="passed to adapters bench (default: its own, bf16 autocast on CUDA, none on the CPU); the "
                    "plain stack computes in its weights' dtype")
    ap.add_argument("--memory-limit", default=None,
                    help="passed to adapters bench (e.g. 1500MiB): its plan picks the micro-batch, checkpointing "
                    "and accumulation that fit; plain: the plain run's measured peak, round by round")
    ap.add_argument("--output", default=None,
                    help="default: benchmarks/results/side-by-side-cpu-<cores>core.json, or -cuda.json on a GPU")
    args = ap.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or not cases:
        ap.error(f"--cases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    device = device_kind()
    name = f"cpu-{os.cpu_count()}core" if device == "cpu" else device
    output = Path(args.output or HERE / "results" / f"side-by-side-{name}.json")

    report = {
        "what": "adapters bench beside the plain stack (benchmarks/baseline/plain_stack.py), same model and "
                "workload, alternating subprocesses; ratios are adapters / plain",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "provenance": provenance(),
        "settings": {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "seed": args.seed,
                     "loss_chunk": args.loss_chunk, "compile": args.compile,
                     "optimizer": {"adapters": args.optimizer or "adamw", "plain": "AdamW"},
                     "master_weights": {"adapters": args.master_weights or "fp32", "plain": "fp32"},
                     "optimizer_in_backward": {"adapters": args.optimizer_in_backward, "plain": False},
                     "memory_limit": {"adapters": args.memory_limit, "plain": None},
                     "mixed_precision": {"adapters": "bf16" if rules.autocasts(device, args.mixed_precision) else "no",
                                         "plain": "bf16 weights" if device == "cuda" else "no"},
                     "gradient_checkpointing": {"adapters": args.gradient_checkpointing,
                                                "plain": "qlora case only (the HF recipe)"},
                     "checkpoint_layers": {"adapters": args.checkpoint_layers, "plain": None},
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                     "peak_memory": "cuda max_memory_allocated" if device == "cuda"
                     else "CPU profiler live tensor bytes around one step after the timed ones"},
        "cases": {},
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    results = report["cases"]
    for case in cases:
        strategy, variant = CASES[case]
        rounds = []
        for i in range(args.rounds):
            measured = {}
            in_plains = args.memory_limit == "plain"  # the plain side first: its peak is adapters' limit
            for side in (("plain", "adapters") if i % 2 == 0 or in_plains else ("adapters", "plain")):
                if side == "plain":
                    measured[side] = run_plain(variant, args)
                else:
                    limit = f"{measured['plain']['peak_bytes']}B" if in_plains else args.memory_limit
                    measured[side] = run_adapters(strategy, args, limit)
            rounds.append(measured)
            ratio = measured["adapters"]["tokens_per_s"] / measured["plain"]["tokens_per_s"]
            memory = measured["adapters"]["peak_bytes"] / measured["plain"]["peak_bytes"]
            print(f"{case} round {i + 1}: adapters/plain tokens/s {ratio:.2f}x, peak {memory:.2f}x", flush=True)
        results[case] = {"adapters_strategy": strategy, "plain_variant": variant, **summarize(rounds)}
        write_json(output, report)  # after each case, so a run stopped part-way keeps what it measured
    for case, r in results.items():
        print(f"{case}: adapters runs at {r['ratios']['tokens_per_s']:.2f}x the plain stack's tokens/s, "
              f"with {r['ratios']['peak_memory']:.2f}x its peak memory")
    print(f"-> {output}")


if __name__ == "__main__":
    main()
