"""The loss's chunk size: peak memory and step time of a training step, for a few chunk sizes and for the model's
own loss (chunk 0), on a real model. Chooses `adapters.rules.DEFAULT_LOSS_CHUNK`.

One LoRA model (the default strategy) on the real SmolLM2, one batch of the built-in data, the core's own
`optimizer_step` with ``loss_chunk`` set. Each setting's peak is the profiler's peak of live CPU tensors in one
step (`adapters.bench.cpu_peak_tensor_bytes`, as `adapters bench` measures it); its time is the median of the
timed steps. The settings take their steps in turn, round after round, so that whatever else the machine runs
slows them alike.

The choice: the largest chunk (the fewest calls of the head) that keeps at least ``--keep`` of the memory the
smallest chunk saves against the model's own loss. Step times on a shared 2-core machine vary by about 10% from
step to step, more than the chunk sizes differ, so they are recorded beside the choice but do not make it.

Usage: python benchmarks/loss_chunk.py [--model smollm2-135m] [--batch-size 4] [--seq-len 256]
       [--chunks 0,64,128,256,512,1024] [--steps 4] [--output benchmarks/results/loss-chunk-cpu-2core.json]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

from adapters.bench import cpu_peak_tensor_bytes
from adapters.bench.provenance import benchmark_record
from adapters.files import write_json
from adapters.loss import loss_path
from adapters.resolver import resolve
from adapters.rules import DEFAULT_LOSS_CHUNK
from adapters.runspec import RunSpec
from adapters.training import build, make_accelerator, make_batches, optimizer_step

HERE = Path(__file__).resolve().parent


def measure(model_name: str, batch_size: int, seq_len: int, chunks: list[int], steps: int, seed: int) -> list[dict]:
    run = resolve(RunSpec(model=model_name, batch_size=batch_size, seq_len=seq_len, seed=seed))
    accelerator = make_accelerator()
    built = build(run, accelerator.device)
    base, model = built.base, built.model
    data = make_batches(run.dataset.train, base, seq_len, "train")
    batch = {k: v[torch.arange(batch_size) % len(data)] for k, v in data.tensors.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.learning_rate)
    model.train()

    def step(chunk: int) -> float:
        return float(optimizer_step(model, [batch], optimizer, accelerator, loss_chunk=chunk)[0])

    step(0)  # the optimizer's state exists from here on, in every setting's peak alike
    peaks = {c: cpu_peak_tensor_bytes(lambda c=c: step(c)) for c in chunks}
    seconds: dict[int, list[float]] = {c: [] for c in chunks}
    losses: dict[int, list[float]] = {c: [] for c in chunks}
    for round_ in range(steps):
        for c in chunks if round_ % 2 == 0 else chunks[::-1]:  # neither order always first
            start = time.perf_counter()
            losses[c].append(step(c))  # reading the loss synchronises: the step's time is all in
            seconds[c].append(time.perf_counter() - start)
    return [{"loss_chunk": c, "loss_path": loss_path(model, c), "peak_bytes": peaks[c],
             "step_s_median": statistics.median(seconds[c]), "step_s": seconds[c], "train_losses": losses[c],
             "tokens_per_s": batch_size * seq_len / statistics.median(seconds[c])} for c in chunks]


def choose(results: list[dict], keep: float) -> int:
    """The largest chunk that saves at least ``keep`` of what the smallest chunk saves against the model's loss."""
    whole = next(r["peak_bytes"] for r in results if r["loss_chunk"] == 0)
    chunked = sorted((r for r in results if r["loss_chunk"] > 0), key=lambda r: r["loss_chunk"])
    most = whole - chunked[0]["peak_bytes"]
    return max(r["loss_chunk"] for r in chunked if whole - r["peak_bytes"] >= keep * most)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--chunks", default="0,64,128,256,512,1024")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(HERE / "results" / "loss-chunk-cpu-2core.json"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    started = time.perf_counter()
    chunks = [int(c) for c in args.chunks.split(",")]
    results = measure(args.model, args.batch_size, args.seq_len, chunks, args.steps, args.seed)
    model_loss = next((r for r in results if r["loss_chunk"] == 0), None)
    for r in results:
        if model_loss:
            r["peak_vs_model_loss"] = r["peak_bytes"] / model_loss["peak_bytes"]
            r["speed_vs_model_loss"] = model_loss["step_s_median"] / r["step_s_median"]
        print(f"{r['loss_path']:>14}: peak {r['peak_bytes'] / 2**20:7.1f} MiB, step {r['step_s_median']:.2f} s"
              + (f" ({r['peak_vs_model_loss']:.2f}x the peak, {r['speed_vs_model_loss']:.2f}x the speed of the "
                 "model's own loss)" if model_loss else ""), flush=True)
    chosen = choose(results, args.keep)
    report = {
        "what": "LoRA training step on the real model: peak CPU tensor memory and step time by loss chunk size "
                "(0: the model's own labels= loss over the whole batch's logits)",
        "model": args.model, "strategy": "lora", "batch_size": args.batch_size, "seq_len": args.seq_len,
        "seed": args.seed, "timed_steps": args.steps, "results": results,
        "choice": {"rule": f"the largest chunk that saves at least {args.keep:.0%} of the peak memory the smallest "
                           "chunk saves against the model's own loss", "chosen": chosen,
                   "default_chunk_in_code": DEFAULT_LOSS_CHUNK},
        **benchmark_record(started),  # seconds, date, provenance (as adapters bench records it), threads, load
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.output), report)
    print(f"chosen: {chosen} (DEFAULT_LOSS_CHUNK in the code: {DEFAULT_LOSS_CHUNK}) -> {args.output}")


if __name__ == "__main__":
    main()
