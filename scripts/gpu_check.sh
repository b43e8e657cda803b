#!/usr/bin/env bash
# The GPU acceptance of the product in one call, on one H200. Writes $1/summary.json (and logs beside it).
#   bash scripts/device_env.sh --stage          # here: copy the device wheels into .whl/ (carry .whl)
#   source scripts/device_env.sh && bash scripts/gpu_check.sh $OUT     # on the GPU machine
#
# Parts (each can be switched off with PART=0; every part runs under its own timeout):
#   TESTS    every GPU-marked test (pytest -m gpu, one run per file)
#   RESUME   `lamamba train` LaMamba-XL 256 bf16 ZeRO-2 (micro MICRO): a checkpoint at step 50, kill -9 (the whole
#            process group) once step 60 is logged, rerun the same command: it must resume from step 50 and reach
#            70, with the losses of steps 51-60 equal to the killed run's within bf16 noise (RESUME_RTOL)
#   EAGER    trainer step vs model step, eager: `lamamba bench-train` (the trainer's own train_step, ZeRO-2) vs
#            `lamamba bench` (a plain PyTorch loop), DiT-XL/2 and LaMamba-XL at 256 px, micro-batches MICROS
#   COMPILED the same with the blocks compiled (default scan backend): compiled training must run
#   AB=1     (off by default) the precision A/B: bf16 vs bf16_autocast, both models, AB_STEPS steps from one start
# The summary's "pass" needs: the tests, the resume check, and every trainer/compiled row without error.
set -uo pipefail
cd "$(dirname "$0")/.."
O=${1:-/tmp/gpu_check}
mkdir -p "$O"
PY=${PYTHON:-python3}
MICRO=${MICRO:-32}      # the resume run's and the precision A/B's micro-batch
MICROS=${MICROS:-32}    # the trainer-vs-model ratios' micro-batches (e.g. MICROS="32 64")
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/lamamba_inductor}
T0=$(date +%s)
: > "$O/timeline.txt"
mark() { echo "$(( $(date +%s) - T0 ))s $*" | tee -a "$O/timeline.txt"; }
# The models (override for a dry run of the script on small models: MODELS, CONFIGS, RES, RESUME_CONFIG, WORKERS)
MODELS=${MODELS:-DiT-XL/2,LaMamba-XL}
CONFIGS=${CONFIGS:-"--config configs/dit_xl2_256.toml --config configs/lamamba_XL_256.toml"}
RES=${RES:-256}
RESUME_CONFIG=${RESUME_CONFIG:-configs/lamamba_XL_256.toml}

ratio() {  # mode(eager|compiled) extra-bench-args extra-train-args: lamamba bench per micro-batch, one bench-train
  local mode=$1 b_extra=$2 t_extra=$3 m
  for m in $MICROS; do
    mark "$mode: lamamba bench, batch $m"
    timeout ${RATIO_TIMEOUT:-240} $PY -m lamamba_dist.cli bench --models $MODELS --resolution $RES --batch $m \
      --steps 15 --warmup 5 $b_extra --out "$O/bench_${mode}_b$m.json" > "$O/bench_${mode}_b$m.log" 2>&1
  done
  mark "$mode: lamamba bench-train, micro-batch ${MICROS// /,}"
  timeout ${RATIO_TIMEOUT:-240} $PY -m lamamba_dist.cli bench-train $CONFIGS --matrix "micro=${MICROS// /,}" \
    --steps 15 --warmup 5 $t_extra --out "$O/train_$mode.json" > "$O/train_$mode.log" 2>&1
}

if [ "${EAGER:-1}" = 1 ]; then
  ratio eager "--profile ${PROFILE_STEPS:-3}" "--profile ${PROFILE_STEPS:-3}"
fi

if [ "${RESUME:-1}" = 1 ]; then
  R="$O/resume"; rm -rf "$R"
  XL=(--config $RESUME_CONFIG --set 'data.shards="synthetic"' --set "checkpoint.dir=\"$R\""
      --set train.micro_batch=$MICRO --set train.global_batch=$MICRO --set train.steps=70 --set checkpoint.every=50
      --set train.log_every=1 --set train.zero_stage=2 --set 'train.precision="bf16"' --set data.num_workers=${WORKERS:-4})
  mark "resume: first run (kill -9 at step 60)"
  setsid $PY -m lamamba_dist.cli train "${XL[@]}" > "$O/resume_first.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 $(( ${RESUME_WAIT:-240} * 10 ))); do
    grep -q '"step": 60,' "$R/stats.jsonl" 2>/dev/null && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
  done
  kill -9 -- -$pid 2>/dev/null; wait $pid 2>/dev/null
  mark "resume: rerun of the same command"
  timeout ${RESUME_TIMEOUT:-200} $PY -m lamamba_dist.cli train "${XL[@]}" > "$O/resume_second.log" 2>&1
  echo $? > "$O/resume_second.rc"
  rm -rf "$R"/step_* "$R"/.compile_cache  # about 13 GB per XL checkpoint
fi

if [ "${TESTS:-1}" = 1 ]; then
  # One pytest per file, each under its own timeout, so that a slow file cannot swallow another's failure report.
  : > "$O/gpu_tests.log"
  for f in $(grep -l "mark.gpu" tests/test_*.py); do
    n=$(basename "$f" .py)
    mark "gpu tests: $n"
    timeout ${TESTS_TIMEOUT:-300} $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rfE --tb=short "$f" \
      --junitxml "$O/gpu_tests_$n.xml" >> "$O/gpu_tests.log" 2>&1
    echo "$n $?" >> "$O/gpu_tests.rc"
  done
fi

if [ "${COMPILED:-1}" = 1 ]; then
  ratio compiled "--compile" "--set train.compile=true"
fi

if [ "${AB:-0}" = 1 ]; then
  mark "precision A/B"
  timeout ${AB_TIMEOUT:-300} $PY -m lamamba_dist.cli bench-train $CONFIGS --micro-batch $MICRO \
    --matrix 'precision="bf16","bf16_autocast"' --steps ${AB_STEPS:-200} --warmup 3 --init-on cpu \
    --out "$O/precision_ab.json" > "$O/precision_ab.log" 2>&1
fi

mark "summary"
$PY scripts/gpu_check_summary.py "$O" --micro $MICRO --rtol ${RESUME_RTOL:-0.02} | tee "$O/summary.json"
