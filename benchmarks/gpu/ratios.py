"""The GPU check's verdict: adapters against the plain stack, measured in the same call, and the issue's goals.

Reads what benchmarks/gpu/run.sh wrote into OUT: side-by-side.json (adapters bench with its defaults beside
benchmarks/baseline/plain_stack.py), the side-by-side-<option>.json files (one case with one option, beside its own
plain-stack run: OPTIONS below), bench-default.json and bench-compile.json or bench-no-compile.json
(adapters bench, compilation the other way round from the default), and
raw_stack.py's anchor-SHAPE.json (or, when it was stopped, the result lines of its log). Prints, for each goal
of issue 22, the ratios adapters / plain stack (tokens/s, and peak memory) with the defaults and with
compilation switched, and whether the goal is met; beside them, the same ratios against raw_stack.py's variants (its
common QLoRA recipe leaves checkpointing off; its best hand-written loops); and the planner's largest error.
Writes all of it to OUT/ratios.json.

Usage: python benchmarks/gpu/ratios.py OUT [--shape llama-1b]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from adapters.files import write_json

# case: (tokens/s at least this many times the plain stack's, at a peak at most this share of its peak): issue 22's
# GPU goals (QLoRA's stretch goal is 0.5x the recipe's peak)
GOALS = {"qlora": (2.5, 1.0), "lora": (1.6, 0.5), "full-finetune": (1.0, 0.6)}
# side_by_side.py runs with one option each (benchmarks/gpu/run.sh, steps side-by-side-options and
# side-by-side-checkpointing): file stem -> mode
OPTIONS = {"side-by-side-qlora-in-plains-memory": "--memory-limit plain",
           "side-by-side-qlora-checkpointing": "--gradient-checkpointing",
           "side-by-side-full-bf16": "--master-weights none"}
PLANNER_GOAL_PCT = 10.0
# adapters' case -> raw_stack.py's variants to set it beside: the same recipe, and the best hand-written loop
RAW = {"qlora": ["qlora", "qlora_gc_train", "qlora_cce_compiled"], "lora": ["lora", "lora_cce_compiled"],
       "full-finetune": ["full", "full_cce_compiled"], "prefix-tuning": ["prefix"], "linear-probe": ["linear_probe"]}
GIB = 2**30


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def bench_rows(report: dict | None) -> dict[str, dict]:
    """adapters bench's measured cases by strategy: tokens/s, peak bytes, prediction error (%)."""
    rows = {}
    for r in (report or {}).get("results", []):
        if r.get("status") == "ok":
            rows[r["strategy"]] = {"tokens_per_s": r["tokens_per_s"], "peak_bytes": r["memory"]["peak_bytes"],
                                   "prediction_error_pct": ((r.get("prediction") or {}).get("error_pct") or {})
                                   .get("total")}
    return rows


def side_rows(report: dict, side: str) -> dict[str, dict]:
    """side_by_side.py's cases by strategy, the medians of its rounds on one ``side``: "adapters" or "plain"."""
    rows = {}
    for case, c in report.get("cases", {}).items():
        runs = c.get(side) or {}
        if not runs.get("tokens_per_s"):
            continue
        rows[case] = {"tokens_per_s": statistics.median(runs["tokens_per_s"]),
                      "peak_bytes": statistics.median(runs["peak_bytes"])}
        if side == "adapters":
            rows[case]["prediction_error_pct"] = (runs.get("prediction_error_pct") or [None])[0]
    return rows


def raw_rows(out: Path, shape: str) -> dict[str, dict]:
    """raw_stack.py's variants by name (its JSON, or its log's result lines when it did not finish)."""
    report = read(out / f"anchor-{shape}.json")
    lines = report["results"] if report else []
    if not report and (out / "raw-stack.log").exists():
        for line in (out / "raw-stack.log").read_text().splitlines():
            if line.startswith("{") and '"strategy"' in line:
                lines.append(json.loads(line))
    return {r["strategy"]: {"tokens_per_s": r["tokens_per_s"], "peak_bytes": r["peak_mem_gib"] * GIB
                            if r.get("peak_mem_gib") is not None else None}
            for r in lines if "error" not in r}


def ratio(ours: dict, theirs: dict | None) -> dict | None:
    """adapters / theirs; the peak's ratio None where theirs has no peak (raw_stack.py on the CPU)."""
    if not theirs or not theirs.get("tokens_per_s"):
        return None
    return {"tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "peak_memory": ours["peak_bytes"] / theirs["peak_bytes"] if theirs.get("peak_bytes") else None}


def meets(r: dict | None, case: str) -> bool:
    """Whether ratios ``r`` meet ``case``'s goal (none: not met)."""
    goal = GOALS.get(case)
    return goal is not None and r is not None and r["tokens_per_s"] >= goal[0] and r["peak_memory"] <= goal[1]


def shown(r: dict | None) -> str:
    if r is None:
        return "not measured"
    peak = f"{r['peak_memory']:.2f}x peak" if r["peak_memory"] is not None else "peak not measured"
    return f"{r['tokens_per_s']:.2f}x tokens/s, {peak}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", default="llama-1b")
    args = ap.parse_args()
    side = read(args.out / "side-by-side.json") or {"cases": {}}
    plain = side_rows(side, "plain")
    measured = {"default": side_rows(side, "adapters"),
                **{mode: bench_rows(read(args.out / f"bench-{mode}.json")) for mode in ("compile", "no-compile")
                   if (args.out / f"bench-{mode}.json").exists()}}
    measured["default"].update(bench_rows(read(args.out / "bench-default.json")))
    raw = raw_rows(args.out, args.shape)

    verdict: dict = {"goals": {}, "options": {}, "against_raw_stack": {}, "planner": {}}
    print(f"adapters / plain stack, same call ({side.get('settings', {}).get('model', '?')}); "
          "tokens/s above 1 and peak below 1 favour adapters")
    for case, (speed_goal, memory_goal) in GOALS.items():
        print(f"{case}: goal >= {speed_goal}x tokens/s at <= {memory_goal}x peak, against plain_stack.py "
              f"{side['cases'].get(case, {}).get('plain_variant', '?')}")
        for mode, rows in measured.items():
            r = ratio(rows[case], plain.get(case)) if case in rows else None
            met = meets(r, case)
            verdict["goals"][f"{case} ({mode})"] = {**(r or {}), "met": met}
            print(f"  {mode:10} {shown(r):34} {'met' if met else 'NOT met'}")
    # Each option's run has its own plain-stack run beside it, in the same call: its ratio is against that one.
    for stem, mode in OPTIONS.items():
        report = read(args.out / f"{stem}.json")
        if report is None:
            continue
        ours, theirs = side_rows(report, "adapters"), side_rows(report, "plain")
        measured[mode] = ours
        for case, row in ours.items():
            r = ratio(row, theirs.get(case))
            met = meets(r, case)
            verdict["options"][f"{case} ({mode})"] = {**(r or {}), "met": met}
            print(f"{case} {mode}: {shown(r)} {'met' if met else 'NOT met'} (its own plain-stack run)")
    print("against raw_stack.py (../shared/anchors/raw_stack.py, same call):")
    for case, variants in RAW.items():
        for mode, rows in measured.items():
            for variant in variants:
                r = ratio(rows[case], raw.get(variant)) if case in rows else None
                if r:
                    verdict["against_raw_stack"][f"{case} ({mode}) / {variant}"] = r
                    print(f"  {case:14} {mode:10} / {variant:19} {shown(r)}")
    errors = {f"{case} ({mode})": row["prediction_error_pct"] for mode, rows in measured.items()
              for case, row in rows.items() if row.get("prediction_error_pct") is not None}
    worst = max(errors.values(), key=abs, default=None)
    verdict["planner"] = {"error_pct": errors, "worst_pct": worst, "goal_pct": PLANNER_GOAL_PCT,
                          "met": worst is not None and abs(worst) <= PLANNER_GOAL_PCT}
    print(f"planner: largest error {worst}% over {len(errors)} cases (goal: within {PLANNER_GOAL_PCT:.0f}%) "
          f"{'met' if verdict['planner']['met'] else 'NOT met'}")
    write_json(args.out / "ratios.json", verdict)


if __name__ == "__main__":
    main()
