"""Packing or padding for instruction data: which trains faster, and to what held-out loss.

On the built-in instruction set (``--data builtin:instructions``) and a real model, trains LoRA for STEPS
optimizer steps with padding and with packing, the same seed, batch of rows and learning rate (constant, the
strategy's default). Both models live in one process and take their steps in turn, padding, packing, padding, ...,
so that whatever else the machine runs slows both alike. Records for each:

- real tokens per second: the tokens of the examples (no padding) that the timed steps trained on, over the
  seconds those steps took (the first WARMUP steps are not timed);
- the held-out loss on the completions (masked labels) before and after training, over the whole held-out split;
- how many examples the steps saw, and how full the rows are (``row_fill``).

Packing puts several examples in a row, so a step of the same number of rows trains on more examples.

Usage: python benchmarks/packing.py [--model smollm2-135m] [--seq-lens 128,256] [--steps 12]
       [--output benchmarks/results/packing-cpu-2core.json]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from itertools import cycle
from pathlib import Path

import torch

from adapters.bench.provenance import benchmark_record
from adapters.files import write_json
from adapters.resolver import resolve
from adapters.rules import IGNORE_INDEX
from adapters.runspec import RunSpec
from adapters.training import build, evaluate, make_accelerator, make_batches, optimizer_step

HERE = Path(__file__).resolve().parent


def real_tokens(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the tokens that belong to examples: the attention mask's (padded rows), or all but a packed row's
    closing padding, which is the last segment of position ids when it trains no label."""
    if "attention_mask" in tensors:
        return tensors["attention_mask"].sum(dim=1)
    position_ids, labels = tensors["position_ids"], tensors["labels"]
    counts = []
    for positions, row_labels in zip(position_ids, labels):
        last = int((positions == 0).nonzero().max())
        closing = bool((row_labels[last:] == IGNORE_INDEX).all()) and last > 0
        counts.append(last if closing else positions.numel())
    return torch.tensor(counts)


class Mode:
    """One model in training, with padding or with packing."""

    def __init__(self, model: str, seq_len: int, batch_size: int, packing: bool, seed: int) -> None:
        self.run = resolve(RunSpec(model=model, data="builtin:instructions", seq_len=seq_len, batch_size=batch_size,
                                   packing=packing, seed=seed))
        self.packing, self.seq_len = packing, seq_len
        self.accelerator = make_accelerator()
        built = build(self.run, self.accelerator.device)
        self.base, self.model = built.base, built.model
        self.train_set = make_batches(self.run.dataset.train, self.base, seq_len, "train", packing=packing)
        eval_set = make_batches(self.run.dataset.heldout, self.base, seq_len, "held-out")
        self.eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=batch_size, collate_fn=eval_set.collate)
        self.lengths = real_tokens(self.train_set.tensors)
        self.per_row = _examples_per_row(self.train_set.tensors)
        order = torch.utils.data.DataLoader(range(len(self.train_set)), batch_size=batch_size, shuffle=True,
                                            generator=torch.Generator().manual_seed(seed))
        self.batches = (rows for _ in cycle([None]) for rows in order)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=self.run.learning_rate)
        self.seconds: list[float] = []
        self.tokens = self.examples = 0
        self.losses: list[float] = []
        self.before = self.heldout_loss()

    def heldout_loss(self) -> float:
        return evaluate(self.model, self.eval_loader, "causal-lm", self.accelerator, len(self.eval_loader))["loss"]

    def step(self, timed: bool) -> None:
        self.model.train()
        rows = next(self.batches)
        batch = self.train_set.collate([self.train_set[int(i)] for i in rows])
        start = time.perf_counter()
        loss, _ = optimizer_step(self.model, [batch], self.optimizer, self.accelerator,
                                 max_grad_norm=self.run.max_grad_norm)
        self.losses.append(float(loss))  # synchronises, so the step's time is all in
        if timed:
            self.seconds.append(time.perf_counter() - start)
            self.tokens += int(self.lengths[rows].sum())
        self.examples += int(self.per_row[rows].sum())

    def result(self, steps: int) -> dict:
        return {
            "packing": self.packing, "seq_len": self.seq_len, "batch_size": self.run.spec.batch_size, "steps": steps,
            "timed_steps": len(self.seconds), "real_tokens_per_s": self.tokens / sum(self.seconds),
            "step_s_median": statistics.median(self.seconds), "rows": len(self.train_set),
            # The examples' tokens over rows x seq_len; padded batches are cut to their longest row, so padding
            # computes fewer tokens than its row_fill suggests.
            "row_fill": float(self.lengths.sum()) / (len(self.train_set) * self.seq_len),
            "examples_seen": self.examples, "train_losses": self.losses,
            "heldout_loss_before": self.before, "heldout_loss_after": self.heldout_loss(),
            "heldout_examples": len(self.eval_loader.dataset),
        }


def compare(model: str, seq_len: int, batch_size: int, steps: int, warmup: int, seed: int) -> list[dict]:
    modes = [Mode(model, seq_len, batch_size, packing, seed) for packing in (False, True)]
    for step in range(steps):
        # Each round starts with the other mode, so neither always follows the other's cache state.
        for mode in modes if step % 2 == 0 else modes[::-1]:
            mode.step(timed=step >= warmup)
    return [mode.result(steps) for mode in modes]


def _examples_per_row(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if "position_ids" not in tensors:
        return torch.ones(len(tensors["input_ids"]), dtype=torch.long)
    trained = real_tokens(tensors)
    # Segments starting inside the real part of each row.
    return torch.tensor([int((p[:n] == 0).sum()) for p, n in zip(tensors["position_ids"], trained)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-lens", default="128,256")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(HERE / "results" / "packing-cpu-2core.json"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    results = []
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        for result in compare(args.model, seq_len, args.batch_size, args.steps, args.warmup, args.seed):
            results.append(result)
            print(f"seq {seq_len} {'packing' if result['packing'] else 'padding'}: {result['real_tokens_per_s']:.0f} "
                  f"real tokens/s, held-out loss {result['heldout_loss_before']:.4f} -> "
                  f"{result['heldout_loss_after']:.4f}, {result['examples_seen']} examples in {args.steps} steps",
                  flush=True)
    comparison = []
    for seq_len in sorted({r["seq_len"] for r in results}):
        pad, pack = (next(r for r in results if r["seq_len"] == seq_len and r["packing"] is p) for p in (False, True))
        comparison.append({"seq_len": seq_len,
                           "speedup": pack["real_tokens_per_s"] / pad["real_tokens_per_s"],
                           "heldout_loss_after": {"padding": pad["heldout_loss_after"],
                                                  "packing": pack["heldout_loss_after"]}})
    report = {
        "what": "LoRA on builtin:instructions: real (non-padding) tokens per second and held-out completion loss "
                "after the same number of steps, padding vs packing",
        "model": args.model, "strategy": "lora", "seed": args.seed, "warmup": args.warmup,
        "results": results, "comparison": comparison,
        **benchmark_record(started),  # seconds, date, provenance (as adapters bench records it), threads, load
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.output), report)
    for c in comparison:
        print(f"seq {c['seq_len']}: packing ran {c['speedup']:.2f} times as many real tokens a second as padding")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
