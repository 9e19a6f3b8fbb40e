#!/usr/bin/env bash
# Issue 13 on a machine with two GPUs (never run yet: the sessions so far were lent one H200 at most).
# Trains random:llama-1b sharded (FSDP2, --sharding fsdp) and data-parallel (DDP) on 2 GPUs, full fine-tuning and
# LoRA, 10 steps of 8 x 512 per GPU each, and runs the equivalence tests on CUDA; every result under $OUT.
# Call it as benchmarks/gpu/run.sh says (carry [".whl"], PYTHONPATH with the wheels, the repository and plugins/):
#   D=$(mktemp -d); OUT=$D bash benchmarks/gpu/fsdp-2gpu.sh; tar czf $OUT/fsdp-2gpu.tar.gz -C $D .
# ($OUT takes at most 8 files back.)
# What to read: each run's metrics.jsonl (tokens/s summed over both processes) and fsdp-2gpu.log, where each process
# prints its own peak (torch.cuda.max_memory_allocated); sharded full fine-tuning should hold about half the
# weights, gradients and AdamW states per GPU that DDP does.
# DRY=1 runs the same at tiny sizes on the CPU (random:tiny, 1 x 32), to check the script itself:
#   DRY=1 OUT=/tmp/fsdp-dry PYTHON=.venv/bin/python bash benchmarks/gpu/fsdp-2gpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
if [[ "${DRY:-0}" == 1 ]]; then
  MODEL=random:tiny BATCH=1 SEQ=32 TESTS=""
else
  MODEL=random:llama-1b BATCH=8 SEQ=512 TESTS="tests/test_distributed.py tests/test_multinode.py"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SCRIPT=$(mktemp --suffix .py)  # adapters train, each process printing its own peak at exit
cat > "$SCRIPT" <<'PY'
import atexit, os, sys
import torch
from adapters.cli import main
if torch.cuda.is_available():
    atexit.register(lambda: print(f"rank {os.environ.get('RANK')} peak "
                                  f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True))
main(sys.argv[1:])
PY
for strategy in full-finetune lora; do
  for sharding in fsdp none; do
    echo "== $strategy --sharding $sharding"
    timeout -s INT 150 "$PY" -m torch.distributed.run --nproc_per_node 2 "$SCRIPT" train --model "$MODEL" --strategy "$strategy" \
      --sharding "$sharding" --batch-size "$BATCH" --seq-len "$SEQ" \
      --max-steps 10 --eval-batches 1 --log-every 5 --output "$OUT/$strategy-$sharding" --json
    cp "$OUT/$strategy-$sharding/metrics.jsonl" "$OUT/metrics-$strategy-$sharding.jsonl" 2>/dev/null
  done
done 2>&1 | tee "$OUT/fsdp-2gpu.log"
[[ -z "$TESTS" ]] || timeout -s INT 200 "$PY" -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -5 \
  | tee -a "$OUT/fsdp-2gpu.log"
