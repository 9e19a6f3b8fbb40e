#!/usr/bin/env bash
# The GPU check (issues 12 and 22) in calls of under 10 minutes each on one H100/H200, every result under $OUT.
# The first run on an H200 (benchmarks/results/h200-2026-11-30/) found one call too short for all of it: each
# process makes the random model once and compiles, so the steps are split, ONLY naming each part, most important
# first. A session has about 15 minutes of device time in all, the machine's start included, and a call may run
# 600 s: each call's step limits below add up to less than that (560, 470 and 285 s).
#   call 1: ONLY="tests side-by-side side-by-side-options ratios"
#   call 2: ONLY="raw-stack optimizer-options compile lora-variants ratios"
#   call 3: ONLY="offload optimizer-8bit inventory inventory-qlora bench side-by-side-checkpointing ratios"
# $OUT takes at most 8 files back: end the command with  tar czf $OUT/gpu.tar.gz -C $D .  where D is the
# folder given to this script as OUT.
#
# On the device machine (../shared/gpu/README.md). First, here, from the repository root:
#   ../shared/gpu/prepare-wheels msgspec==0.23.0     # bitsandbytes, gguf and msgspec for Python 3.12, into .whl/
# then the device tool's run, with carry [".whl"] and the command:
#   S=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --no-compile --target $S .whl/*.whl && export PYTHONPATH=$S:$PWD:$PWD/plugins || exit; bash benchmarks/gpu/run.sh
# (liger-kernel, the optional fused loss, is a pure-Python wheel: add liger-kernel==VERSION to prepare-wheels to
# measure with it.) Commit what comes back under benchmarks/results/, with the device named.
#
# Without a GPU, DRY=1 runs every step at tiny sizes on the CPU (random:tiny, batch 1 x 64, one timed step, no
# compiled variants of raw_stack.py), to check the script itself:
#   DRY=1 OUT=/tmp/gpu-dry PYTHON=.venv/bin/python bash benchmarks/gpu/run.sh
#
# The steps, in order of what matters most; each runs under its own time limit (SIGINT first: adapters bench
# then writes what it measured), so the whole stays under the budget and one failure does not lose the rest.
# Each step's output goes to $OUT/<step>.log, its exit status and seconds to $OUT/steps.jsonl.
#   tests        the GPU-marked tests (pytest -m gpu)
#   side-by-side adapters bench lora, full-finetune, qlora (defaults) beside the plain stack's full fine-tuning,
#                LoRA and HF QLoRA recipe (benchmarks/baseline/plain_stack.py), alternating -> side-by-side.json
#   side-by-side-options  the same, one option at a time, each beside its own plain-stack run: qlora with
#                --memory-limit plain (the recipe's measured peak as its limit: the plan checkpoints the fewest
#                layers that fit) -> side-by-side-qlora-in-plains-memory.json; full-finetune with
#                --master-weights none -> side-by-side-full-bf16.json
#   side-by-side-checkpointing  qlora with --gradient-checkpointing, every layer (as the HF recipe runs)
#                -> side-by-side-qlora-checkpointing.json
#   raw-stack    raw_stack.py, the hand-written reference loop of ../shared/design/anchors.md -> anchor-*.json
#   bench        adapters bench prefix-tuning, linear-probe (defaults) -> bench-default.json
#   compile      adapters bench lora, qlora, full-finetune with compilation the other way round from the device's default: --compile
#                where it is off by default, --no-compile where it is on (so both ways are measured)
#                -> bench-compile.json or bench-no-compile.json
#   inventory    inventory.py: what a step keeps for backward, tensor by tensor, at 2 and 4 layers -> inventory.json;
#                and QLoRA beside LoRA with the layers compiled, as CUDA runs them -> inventory-qlora-compiled.json
#   optimizer-options  optimizer_options.py: full fine-tuning with AdamW, the optimizer in backward, bf16 without
#                master weights, both, adamw8bit and paged_adamw8bit: peak, plan error, tokens/s, held-out loss
#                -> optimizer-options.json
#   lora-variants adapters bench lora with each variant: DoRA, rsLoRA, PiSSA, LoRA+ and LoftQ (CUDA only)
#                -> bench-lora-*.json
#   ratios       ratios.py: adapters against the plain stack and the issue's goals -> ratios.json
# ONLY="compile ratios" runs only the steps named (a second call, after one was cut short by its limit).
set -uo pipefail

cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export OUT HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STRATEGIES=lora,qlora,full-finetune  # the compile step: the three with goals (five ran past its limit)

if [[ "${DRY:-0}" == 1 ]]; then
  MODEL=random:tiny SHAPE=tiny BATCH=1 SEQ=64 STEPS=1 WARMUP=1 SCALE=8 INVENTORY_LAYERS=1
  RAW_ONLY=${RAW_ONLY:-full,lora,qlora,qlora_gc_train,qlora_lean,prefix,linear_probe}
else
  MODEL=random:llama-1b SHAPE=llama-1b BATCH=8 SEQ=512 STEPS=10 WARMUP=3 SCALE=1
  RAW_ONLY=${RAW_ONLY:-full,lora,qlora,qlora_gc_train,qlora_cce_compiled,prefix,linear_probe}
fi
SHAPE_ARGS=(--batch-size "$BATCH" --seq-len "$SEQ" --steps "$STEPS" --warmup "$WARMUP")

# step NAME SECONDS COMMAND...: run COMMAND under a limit of SECONDS (times SCALE), its output to $OUT/NAME.log.
step() {
  local name=$1 limit=$(( $2 * SCALE )) start=$SECONDS rc
  shift 2
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s): $*"
  timeout -s INT -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( SECONDS - start )), \"limit_s\": $limit}" >> "$OUT/steps.jsonl"
  tail -n 5 "$OUT/$name.log"
  echo "== $name: exit $rc after $(( SECONDS - start ))s"
}

{ nvidia-smi || true; "$PY" -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"; } \
  > "$OUT/machine.txt" 2>&1

if [[ $("$PY" -c "from adapters.rules import compiles; print(compiles(None, 'cuda'))") == True ]]; then
  OTHER=no-compile
else
  OTHER=compile
fi

mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/*.py)
step tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$OUT/gpu-tests.xml" "${GPU_TESTS[@]}"
step side-by-side 200 "$PY" benchmarks/side_by_side.py --model "$MODEL" "${SHAPE_ARGS[@]}" \
  --output "$OUT/side-by-side.json"
# Both run even when the first fails (its fit may choose the offload path, measured here for the first time).
step side-by-side-options 200 bash -c '"$0" benchmarks/side_by_side.py --model "$1" --cases qlora \
  --memory-limit plain ${@:2} --output "$OUT/side-by-side-qlora-in-plains-memory.json"; first=$?; "$0" \
  benchmarks/side_by_side.py --model "$1" --cases full-finetune --master-weights none ${@:2} \
  --output "$OUT/side-by-side-full-bf16.json" && exit $first' "$PY" "$MODEL" "${SHAPE_ARGS[@]}"
step side-by-side-checkpointing 120 "$PY" benchmarks/side_by_side.py --model "$MODEL" --cases qlora \
  --gradient-checkpointing "${SHAPE_ARGS[@]}" --output "$OUT/side-by-side-qlora-checkpointing.json"
step inventory 45 "$PY" benchmarks/gpu/inventory.py --layers "${INVENTORY_LAYERS:-2,4}" --batch-size "$BATCH" \
  --seq-len "$SEQ" --output "$OUT/inventory.json"
step inventory-qlora 60 "$PY" benchmarks/gpu/inventory.py --strategies qlora,lora --compile \
  --layers "${INVENTORY_LAYERS:-2,4}" --batch-size "$BATCH" --seq-len "$SEQ" --output "$OUT/inventory-qlora-compiled.json"
step raw-stack 90 "$PY" benchmarks/gpu/raw_stack.py --shape "$SHAPE" --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" \
  --warmup "$WARMUP" --only "$RAW_ONLY" --out "$OUT"
step bench 60 "$PY" -m adapters bench --model "$MODEL" --strategies prefix-tuning,linear-probe "${SHAPE_ARGS[@]}" \
  --output "$OUT/bench-default.json" --overwrite
step compile 100 "$PY" -m adapters bench --model "$MODEL" --strategies "$STRATEGIES" "--$OTHER" "${SHAPE_ARGS[@]}" \
  --output "$OUT/bench-$OTHER.json" --overwrite
step offload 60 "$PY" -m adapters bench --model "$MODEL" --strategies lora --offload-activations "${SHAPE_ARGS[@]}" \
  --output "$OUT/bench-offload-activations.json" --overwrite
step optimizer-8bit 60 "$PY" -m adapters bench --model "$MODEL" --strategies full-finetune --optimizer paged_adamw8bit \
  "${SHAPE_ARGS[@]}" --output "$OUT/bench-paged-adamw8bit.json" --overwrite
step optimizer-options 150 "$PY" benchmarks/optimizer_options.py --model "$MODEL" --batch-size "$BATCH" --seq-len "$SEQ" \
  --steps "$STEPS" --bench-steps "$STEPS" --options adamw,in-backward,bf16,bf16+in-backward,adamw8bit,paged_adamw8bit \
  --output "$OUT/optimizer-options.json"
# LoRA's variants (the lora strategy's options): one bench each, the plan beside it; LoftQ needs CUDA (not in DRY).
LORA_VARIANTS=("use_dora=true" "use_rslora=true" "init=pissa_niter_4" "lora_plus_ratio=16")
[[ "${DRY:-0}" == 1 ]] || LORA_VARIANTS+=("init=loftq")
step lora-variants 120 env PY="$PY" MODEL="$MODEL" SHAPE_ARGS="${SHAPE_ARGS[*]}" bash -c 'for v in "$@"; do
  "$PY" -m adapters bench --model "$MODEL" --strategies lora --set "$v" $SHAPE_ARGS \
    --output "$OUT/bench-lora-${v//[=_]/-}.json" --overwrite || exit; done' _ "${LORA_VARIANTS[@]}"
step ratios 10 "$PY" benchmarks/gpu/ratios.py "$OUT" --shape "$SHAPE"

echo "results in $OUT"
