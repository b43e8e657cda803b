#!/usr/bin/env bash
# The trainer's matrix on one H200: DiT-XL/2 and LaMamba-XL, 256 and 512 px, bf16, ZeRO 0/1/2/3, activation
# checkpointing off/on: img/s and peak memory of `lamamba train`'s own step (`lamamba bench-train`, one launch per
# resolution, the engine rebuilt and freed between rows; a failure is an error row). About 8 minutes.
#   bash scripts/device_env.sh --stage WHEEL_DIR                           # here, once
#   source scripts/device_env.sh && bash scripts/h200_train_matrix.sh OUT  # on the GPU machine
#   python3 -m lamamba_dist.cli bench scaling OUT/train_matrix_*.json                # the tables (markdown)
# MICRO256 / MICRO512: micro-batches (default 32 / 16); STEPS / WARMUP: timed / untimed steps per row;
# RESOLUTIONS: which halves (default "256 512").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/h200_train_matrix}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
for res in ${RESOLUTIONS:-256 512}; do
  micro=$([ $res = 256 ] && echo "${MICRO256:-32}" || echo "${MICRO512:-16}")
  timeout ${ROW_TIMEOUT:-290} $PY -m lamamba_dist.cli bench-train \
    --config configs/dit_xl2_$res.toml --config configs/lamamba_XL_$res.toml \
    --matrix "zero=0,1,2,3;gc=false,true" --set 'train.precision="bf16"' --micro-batch $micro \
    --steps ${STEPS:-5} --warmup ${WARMUP:-3} --out "$OUT/train_matrix_$res.json" 2>&1 | grep "^\[bench-train\]"
done
