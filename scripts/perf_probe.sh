#!/usr/bin/env bash
# Perf investigation on one H200: GPU parity tests, eager and compiled `lamamba bench` with compile
# statistics, then a profile of the compiled LaMamba step. Writes logs under $1 (default /tmp/probe).
#   source scripts/device_env.sh && bash scripts/perf_probe.sh $OUT
# SCANS="auto triton ss2d_triton": scan backends of the extra compiled LaMamba-only runs (part X, ratio against
# the DiT of part COMPILED); MEMBUDGETS="0.5": both models compiled with that activation memory budget; PARITY=1: `lamamba parity` 200-step loss curves, fast vs reference kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
O=${1:-/tmp/probe}; mkdir -p "$O"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
PY=${PYTHON:-python3}
RES=${RES:-256}; BATCH=${BATCH:-64}
if [ "${TESTS:-1}" = 1 ]; then
  timeout ${TTIMEOUT:-240} $PY -m pytest -q -m gpu tests/ops/test_ops.py tests/models/test_gpu_model.py tests/ops/test_scan_triton.py \
    $(ls tests/ops/test_ss2d_triton.py 2>/dev/null) tests/bench/test_parity.py -k "not 200_steps" 2>&1 | tail -8 | tee "$O/gpu_tests.log"
fi
if [ "${PARITY:-1}" = 1 ]; then
  for scan in ${PARITY_SCANS:-auto}; do
    timeout 240 $PY -m lamamba_dist.cli parity --model LaMamba-debug --resolution 128 --batch 16 --steps 200 \
      --scan-backend $scan --out "$O/parity_$scan.json" 2>&1 | grep "^#" | tail -1 | tee -a "$O/parity.log"
  done
fi
if [ "${EAGER:-1}" = 1 ]; then
  timeout 120 $PY -m lamamba_dist.cli bench --models DiT-XL/2,LaMamba-XL --resolution $RES --batch $BATCH --steps 10 \
    --warmup 3 --out "$O/eager_$RES.json" 2>&1 | grep "^#" | tee "$O/eager.log"
fi
if [ "${COMPILED:-1}" = 1 ]; then
  # LaMamba first: its time to first step is paid on a cold inductor cache
  # TORCH_LOGS=recompiles names the guard behind every extra graph (LaMamba-XL should compile 4 block graphs)
  TORCH_LOGS=${TORCH_LOGS:-recompiles} timeout ${CTIMEOUT:-300} $PY -m lamamba_dist.cli bench --models LaMamba-XL,DiT-XL/2 --resolution $RES --batch $BATCH \
    --steps 10 --warmup 3 --compile --out "$O/compiled_$RES.json" > "$O/compiled.log" 2>&1
  grep "^#" "$O/compiled.log"; grep -E '"unique_graphs"|"time_to_first' "$O/compiled.log"
  grep -i -A3 "recompil" "$O/compiled.log" | head -40
  tail -3 "$O/compiled.log"
fi
if [ -n "${SCANS:-}" ]; then
  for scan in $SCANS; do
    timeout ${CTIMEOUT:-300} $PY -m lamamba_dist.cli bench --models LaMamba-XL --resolution $RES --batch $BATCH \
      --steps 10 --warmup 3 --compile --scan-backend $scan --out "$O/compiled_${RES}_$scan.json" 2>&1 | grep "^#" \
      | tail -1 | sed "s/^/[$scan] /" | tee -a "$O/scans.log"
  done
fi
if [ "${AB_PLAIN:-1}" = 1 ]; then  # the lean SS2D backward (default) vs plain autograd, eager, LaMamba only
  timeout 120 $PY -m lamamba_dist.cli bench --models LaMamba-XL --resolution $RES --batch $BATCH --steps 10 --warmup 3 \
    --plain-scan-backward --out "$O/eager_${RES}_plain.json" 2>&1 | grep "^#" | tail -1 | sed "s/^/[plain backward] /" \
    | tee "$O/ab_plain.log"
fi
for mb in ${MEMBUDGETS:-}; do  # both models compiled with AOT autograd's activation memory budget mb
  timeout ${CTIMEOUT:-300} $PY -m lamamba_dist.cli bench --models DiT-XL/2,LaMamba-XL --resolution $RES --batch $BATCH \
    --steps 10 --warmup 3 --compile --memory-budget $mb --out "$O/compiled_${RES}_mb$mb.json" 2>&1 | grep "^#" \
    | sed "s/^/[budget $mb] /" | tee -a "$O/membudget.log"
done
if [ "${PROFILE:-1}" = 1 ]; then
  # torch.profiler over 3 steps after the timed ones: the JSON's "profile" has the kernel launches per step and the
  # top device kernels
  timeout 180 $PY -m lamamba_dist.cli bench --models LaMamba-XL --resolution $RES --batch $BATCH --steps 3 --warmup 3 \
    --profile 3 ${PCOMPILE:---compile} --out "$O/profile.json" > "$O/profile.log" 2>&1
  grep "^#" "$O/profile.log" | tee "$O/profile_short.txt"
fi
