#!/usr/bin/env bash
# Issue 5's GPU acceptance on one H200 (run on the device machine from the repository root):
#   1. LaMamba-XL @256, bf16, ZeRO-2: 60 steps with a checkpoint at 50, then a rerun that resumes and reaches 70;
#   2. img/s and peak memory for ZeRO 0/1/2/3 x activation checkpointing off/on (30 steps each, synthetic latents).
# Prints one JSON line per configuration (from stats.jsonl: the mean of the last log intervals) to stdout.
# Needs deepspeed + pydantic/hjson... from shared/wheels/device in PYTHONPATH (see ENVIRONMENT.md); wandb may be absent.
#   MICRO=32 STEPS=30 bash scripts/h200_train_matrix.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/h200_train}
MICRO=${MICRO:-32}
STEPS=${STEPS:-30}
export NCCL_NVLS_ENABLE=0 WANDB_MODE=disabled
export TORCH_CUDA_ARCH_LIST=9.0   # the image's "9.0a" breaks DeepSpeed's op builder (ENVIRONMENT.md)
PY=${PYTHON:-python3}
train() {  # run_dir zero gc steps every extra...
  local dir=$1 zero=$2 gc=$3 steps=$4 every=$5; shift 5
  $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m lamamba_dist.cli train \
    --config configs/lamamba_XL_256.toml --set data.shards='"synthetic"' --set checkpoint.dir="\"$dir\"" \
    --set train.zero_stage=$zero --set model.grad_checkpointing=$gc --set train.steps=$steps \
    --set checkpoint.every=$every --set train.global_batch=$MICRO --set train.micro_batch=$MICRO \
    --set train.log_every=10 --set data.num_workers=2 "$@"
}
summary() {  # run_dir label
  $PY - "$1" "$2" <<'PYEOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1] + "/stats.jsonl") if '"img_per_s"' in l]
tail = recs[1:] or recs  # the first interval includes warm-up
m = lambda k: sum(r[k] for r in tail if r.get(k) is not None) / max(1, sum(r.get(k) is not None for r in tail))
print(json.dumps({"run": sys.argv[2], "img_per_s": round(m("img_per_s"), 1), "peak_mem_gib": round(max(r["peak_mem_gib"] for r in recs), 1),
                  "mfu": round(m("mfu"), 4) if any(r.get("mfu") for r in tail) else None, "last_loss": recs[-1]["loss"],
                  "steps": recs[-1]["step"]}))
PYEOF
}
rm -rf "$OUT"; mkdir -p "$OUT"
# 1. train 60 steps (checkpoint at 50 and 60), then resume from 60 to 70: the rerun must say "resumed from".
train "$OUT/resume" 2 false 60 50
train "$OUT/resume" 2 false 70 50 2>&1 | tee "$OUT/resume.log" | grep -E "resumed from|saved" || true
grep -q "resumed from .*step_00000060" "$OUT/resume.log" && echo '{"resume": "ok"}' || echo '{"resume": "FAILED"}'
summary "$OUT/resume" "xl256-zero2-bf16-resume"
rm -rf "$OUT"/resume/step_*   # ~13 GB per XL checkpoint (DeepSpeed state + fp32 EMA + fp32 weights)
# 2. the matrix.
for zero in 0 1 2 3; do
  for gc in false true; do
    d="$OUT/z${zero}_gc${gc}"
    if train "$d" $zero $gc $STEPS 100000 > "$d.log" 2>&1; then summary "$d" "xl256-zero${zero}-gc${gc}-micro${MICRO}"
    else echo "{\"run\": \"xl256-zero${zero}-gc${gc}\", \"error\": \"see $d.log\"}"; fi
    rm -rf "$d"/step_*
  done
done
