#!/usr/bin/env bash
# The GPU acceptance of the product in one call, on one H200. Writes $1/summary.json (and logs beside it).
#   bash scripts/device_env.sh --stage WHEEL_DIR   # here: copy the GPU wheels into .whl/ (copy .whl along)
#   source scripts/device_env.sh && bash scripts/gpu_check.sh $OUT     # on the GPU machine
#
# Two phases, so that the whole check fits in one 10-minute device call (462 s on an H200 at 0ae7b82, CKPT=1 included;
# 565 s with ABA=1 on an H100 on 2026-12-05, the GPU tests alone 329 s of it):
#   1. untimed work, concurrently (the GPU has room for all of it; nothing here is a speed figure):
#      TESTS   every GPU-marked test (one pytest, TEST_WORKERS processes with pytest-xdist when installed)
#      RESUME  `lamamba train` LaMamba-XL 256 bf16 ZeRO-2 (micro MICRO): a checkpoint at step 50 (written at
#              once: a background save of XL takes longer than the ten steps to the kill; part CKPT and the GPU
#              tests cover background saves), kill -9 (the whole process group) once step 60 is logged, rerun the
#              same command: it must resume from step 50 and reach 70, with the losses of steps 51-60 equal to
#              the killed run's within bf16 noise
#      WARM    the compiled rows' first steps (fills the compile cache, TORCHINDUCTOR_CACHE_DIR)
#   2. the timed rows, one process at a time, the GPU to themselves:
#      EAGER    trainer step vs model step: `lamamba bench-train` (the trainer's own train_step, ZeRO-2) vs
#               `lamamba bench` (a plain PyTorch loop), MODELS at 256 px, micro-batches MICROS
#      COMPILED the same with the blocks compiled (default scan backend), micro-batches CMICROS (default MICRO):
#               compiled training must run
#   CKPT=1 (off by default: about 120 s, beyond the deadline) adds `lamamba train` (RESUME's config) with a
#   background save at step CKPT_AT (200): the time training was blocked, and img/s while the save is written
#   (about 20 s of steps) vs img/s over the steps before it and the CKPT_AFTER (5) windows after it (summary
#   "background_save"). Alone: TESTS=0 RESUME=0 EAGER=0 COMPILED=0 CKPT=1 bash scripts/gpu_check.sh OUT
#   AB=1 (off by default) adds the precision A/B: bf16 vs bf16_autocast, both models (AB_CONFIGS: others), AB_STEPS
#   steps from one start.
#   ABA=1 (off by default) runs the model rows again after the trainer's (model, trainer, model): the ratio is then
#   to the mean of the two model figures, and "bench_drift" (second / first) shows how much the machine drifted.
#   HOST_PROFILE_STEPS=N (off by default) adds N steps with the host sampled to every timed row (`--host-profile`:
#   the main thread's time by Python line, GC, host syncs; far cheaper than torch.profiler).
#   COMPILE_MODE=reduce-overhead (default: default) compiles the COMPILED rows (model and trainer) in that mode.
#   TRAIN_AXES="section.key=a,b" adds matrix axes to the trainer's timed rows (A/B of a trainer setting in one
#   process, e.g. TRAIN_AXES="optim.ema_overlap=false,true"); each row gets its ratio to the same model row.
#   CTRAIN_AXES (default: TRAIN_AXES) does the same for the compiled trainer rows alone.
#   PROFILE_STEPS=N (off by default) adds N profiled steps to every timed row (torch.profiler after the timed steps:
#   host time, device busy time and idle fraction per step, the top operators; the summary keeps the totals).
# Each part can be switched off with PART=0 and runs under its own timeout; the timed rows also end by DEADLINE
# (570 s after the start, so that one device call of 600 s always gets its summary). The summary's "pass" needs the tests,
# the resume check and every compiled trainer row without error; the ratios (<= 1.05) are reported beside it.
# On a card of less than 100 GiB (an H100 80GB) phase 1 does not fit beside itself: the compile warm-up runs after
# the resume run instead of beside it, the suite gets TEST_WORKERS=4, and the whole check takes two device calls
# on the warm machine, into one folder on its disk that the second call summarizes (PHASES, default "1 2"):
#   PHASES=1 TESTS_TIMEOUT=540 bash scripts/gpu_check.sh /tmp/gc    # untimed: tests, resume, warm-up
#   PHASES=2 bash scripts/gpu_check.sh /tmp/gc; cp /tmp/gc/summary.json $OUT/   # timed rows + the summary
set -uo pipefail
cd "$(dirname "$0")/.."
O=${1:-/tmp/gpu_check}
mkdir -p "$O"
PY=${PYTHON:-python3}
MICRO=${MICRO:-32}           # the resume run's and the precision A/B's micro-batch
MICROS=${MICROS:-"32 64"}    # the eager trainer-vs-model ratios' micro-batches
CMICROS=${CMICROS:-$MICRO}   # the compiled ones' (compiling a row costs about a minute; 64 on demand: CMICROS="32 64")
STEPS=${STEPS:-20}           # timed steps per ratio row (after WARMUP untimed ones): eager DiT-XL/2 at micro-batch 32
WARMUP=${WARMUP:-8}          # is host-bound, and its first steps in a process (loader workers starting) vary by 10%
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/lamamba_inductor}
PHASES=" ${PHASES:-1 2} "     # which phases run; the summary reads whatever both left in $O
phase() { [[ "$PHASES" == *" $1 "* ]]; }
T0=$(date +%s)
if phase 1; then : > "$O/timeline.txt"; else echo "0s phase 2 (phase 1's results from an earlier call)" >> "$O/timeline.txt"; fi
mark() { echo "$(( $(date +%s) - T0 ))s $*" | tee -a "$O/timeline.txt"; }
# GPU memory in MiB (0 where nvidia-smi is missing): below 100 GiB, phase 1's parts are partly sequenced (above)
GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc 0-9)
SMALL_GPU=0; [ "${GPU_MIB:-0}" -gt 0 ] && [ "${GPU_MIB:-0}" -lt 102400 ] && SMALL_GPU=1
TEST_WORKERS=${TEST_WORKERS:-$([ $SMALL_GPU = 1 ] && echo 4 || echo 6)}
# The models (override for a dry run of the script on small models: MODELS, CONFIGS, RES, RESUME_CONFIG, WORKERS)
MODELS=${MODELS:-DiT-XL/2,LaMamba-XL}
CONFIGS=${CONFIGS:-"--config configs/dit_xl2_256.toml --config configs/lamamba_XL_256.toml"}
RES=${RES:-256}
RESUME_CONFIG=${RESUME_CONFIG:-configs/lamamba_XL_256.toml}
BATCHES=${MICROS// /,}
CBATCHES=${CMICROS// /,}
CMODE=${COMPILE_MODE:-default}  # torch.compile's mode of the compiled rows (both tools): models/compile.py
LAMAMBA="$PY -m lamamba_dist.cli"
DEADLINE=${DEADLINE:-570}   # seconds after the start by which every timed row has ended (the summary follows)
left() {  # seconds a phase-2 part may run: its own limit, or what is left before the deadline
  local lim=${RATIO_TIMEOUT:-200} rest=$(( DEADLINE - ($(date +%s) - T0) ))
  [ $rest -lt $lim ] && lim=$rest
  [ $lim -lt 1 ] && lim=1
  echo $lim
}

bench() {  # batches out-name steps warmup extra...: `lamamba bench`, every model and micro-batch in one process
  local batches=$1 name=$2 steps=$3 warmup=$4; shift 4
  timeout $(left) $LAMAMBA bench --models $MODELS --resolution $RES --batch $batches \
    --steps $steps --warmup $warmup "$@" --out "$O/$name.json" > "$O/$name.log" 2>&1
}
bench_train() {  # the same for `lamamba bench-train` (the trainer's own step); AXES: extra matrix axes
  local batches=$1 name=$2 steps=$3 warmup=$4; shift 4
  timeout $(left) $LAMAMBA bench-train $CONFIGS --matrix "micro=$batches${AXES:+;$AXES}" \
    --steps $steps --warmup $warmup "$@" --out "$O/$name.json" > "$O/$name.log" 2>&1
}

# ---------------------------------------------------------------- phase 1: untimed, concurrently
pids=()
warm_parts() {  # the compiled rows' graphs (per model and micro-batch, bench's and the trainer's) into the compile
  # cache: two processes (one per tool, the models one after the other), so that GPU memory holds one row of each
  (mark "warm: bench --compile"
   timeout ${WARM_TIMEOUT:-300} $LAMAMBA bench --models $MODELS --resolution $RES --batch $CBATCHES --steps 1 \
     --warmup 1 --compile --compile-mode $CMODE --out "$O/warm_bench.json" > "$O/warm_bench.log" 2>&1
   mark "warm: bench done (rc $?)") &
  local a=$!
  (mark "warm: bench-train compiled"
   timeout ${WARM_TIMEOUT:-300} $LAMAMBA bench-train $CONFIGS --matrix "micro=$CBATCHES" --steps 1 --warmup 1 \
     --set train.compile=true --set "train.compile_mode=\"$CMODE\"" --out "$O/warm_train.json" > "$O/warm_train.log" 2>&1
   mark "warm: bench-train done (rc $?)") &
  local b=$!
  wait $a $b
}
WARM_NOW=0; [ "${COMPILED:-1}" = 1 ] && [ "${WARM:-1}" = 1 ] && WARM_NOW=1
phase 1 || { TESTS=0; RESUME=0; WARM_NOW=0; }
if [ "${TESTS:-1}" = 1 ]; then
  (
    mark "tests: start"
    par=()
    if $PY -c "import xdist" 2>/dev/null && [ "$TEST_WORKERS" -gt 1 ]; then
      par=(-n "$TEST_WORKERS" --dist worksteal)  # idle workers take queued tests from busy ones
    fi
    # SIGINT at the suite's limit: pytest stops and still writes its report (which test ran long, in --durations)
    setsid timeout -s INT -k 20 ${TESTS_TIMEOUT:-360} $PY -m pytest -m gpu -p no:cacheprovider -o addopts="" -v -rfE \
      --tb=short --durations=15 "${par[@]}" --timeout ${TEST_TIMEOUT:-240} --junitxml "$O/gpu_tests.xml" \
      $(grep -rl --include="test_*.py" "mark.gpu" tests | sort) > "$O/gpu_tests.log" 2>&1 &
    tp=$!; echo $tp > "$O/.tests.pgid"; wait $tp
    echo $? > "$O/gpu_tests.rc"
    mark "tests: done (rc $(cat "$O/gpu_tests.rc"))"
  ) &
  pids+=($!)
fi

if [ "${RESUME:-1}" = 1 ]; then
  (
    R="$O/resume"; rm -rf "$R"
    XL=(--config $RESUME_CONFIG --set 'data.shards="synthetic"' --set "checkpoint.dir=\"$R\""
        --set train.micro_batch=$MICRO --set train.global_batch=$MICRO --set train.steps=70 --set checkpoint.every=50
        --set train.log_every=1 --set train.zero_stage=2 --set 'train.precision="bf16"' --set data.num_workers=${WORKERS:-4}
        --set checkpoint.background=false)
    # killed once step KILL_AT is logged and the step-50 checkpoint is published (until it is, a rerun would
    # rightly start from scratch)
    mark "resume: first run (kill -9 at step ${KILL_AT:-60} or later, once step 50 is published)"
    setsid $LAMAMBA train "${XL[@]}" > "$O/resume_first.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 $(( ${RESUME_WAIT:-240} * 10 ))); do
      grep -q "\"step\": ${KILL_AT:-60}," "$R/stats.jsonl" 2>/dev/null \
        && grep '"event": "checkpoint"' "$R/stats.jsonl" 2>/dev/null | grep -q '"step": 50,' && break
      kill -0 $pid 2>/dev/null || break
      sleep 0.1
    done
    kill -9 -- -$pid 2>/dev/null; wait $pid 2>/dev/null
    mark "resume: rerun of the same command"
    timeout ${RESUME_TIMEOUT:-200} $LAMAMBA train "${XL[@]}" > "$O/resume_second.log" 2>&1
    echo $? > "$O/resume_second.rc"
    rm -rf "$R"/step_* "$R"/.compile_cache  # about 13 GB per XL checkpoint
    mark "resume: done (rc $(cat "$O/resume_second.rc"))"
    # on a small card the warm-up waits for the resume run's memory (beside it, a row ran out of memory)
    [ $SMALL_GPU = 1 ] && [ $WARM_NOW = 1 ] && warm_parts
  ) &
  pids+=($!)
  [ $SMALL_GPU = 1 ] && WARM_NOW=0
fi

if [ $WARM_NOW = 1 ]; then
  warm_parts &
  pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; done
# Nothing of phase 1 may outlive it (a timed-out test's worker would share the GPU with the timed rows)
[ -f "$O/.tests.pgid" ] && kill -9 -- -"$(cat "$O/.tests.pgid")" 2>/dev/null; rm -f "$O/.tests.pgid"
if phase 2; then
  others=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null | tr '\n' ';')
  mark "timed rows start; other GPU processes: ${others:-none}"
fi

# ---------------------------------------------------------------- phase 2: timed, one at a time
phase 2 || { EAGER=0; COMPILED=0; CKPT=0; AB=0; }
if [ "${EAGER:-1}" = 1 ]; then
  prof=(); [ "${PROFILE_STEPS:-0}" -gt 0 ] && prof=(--profile "$PROFILE_STEPS")
  [ "${HOST_PROFILE_STEPS:-0}" -gt 0 ] && prof+=(--host-profile "$HOST_PROFILE_STEPS")
  mark "eager: lamamba bench, batch $BATCHES"; bench $BATCHES bench_eager $STEPS $WARMUP "${prof[@]}"
  mark "eager: lamamba bench-train, micro-batch $BATCHES"; AXES=${TRAIN_AXES:-} bench_train $BATCHES train_eager $STEPS $WARMUP "${prof[@]}"
  [ "${ABA:-0}" = 1 ] && { mark "eager: lamamba bench again (ABA)"; bench $BATCHES bench_eager_after $STEPS $WARMUP; }
fi
if [ "${COMPILED:-1}" = 1 ]; then
  prof=(); [ "${PROFILE_STEPS:-0}" -gt 0 ] && prof=(--profile "$PROFILE_STEPS")
  [ "${HOST_PROFILE_STEPS:-0}" -gt 0 ] && prof+=(--host-profile "$HOST_PROFILE_STEPS")
  mark "compiled: lamamba bench, batch $CBATCHES"; bench $CBATCHES bench_compiled $STEPS $WARMUP --compile --compile-mode $CMODE "${prof[@]}"
  mark "compiled: lamamba bench-train, micro-batch $CBATCHES"
  AXES=${CTRAIN_AXES-${TRAIN_AXES:-}} bench_train $CBATCHES train_compiled $STEPS $WARMUP --set train.compile=true --set "train.compile_mode=\"$CMODE\"" \
    "${prof[@]}"
  [ "${ABA:-0}" = 1 ] && { mark "compiled: lamamba bench again (ABA)"
                           bench $CBATCHES bench_compiled_after $STEPS $WARMUP --compile --compile-mode $CMODE; }
fi

if [ "${CKPT:-0}" = 1 ]; then
  # A periodic (background) save in timed training: the time training was blocked, and img/s while the save is
  # written against img/s before it and after it (10-step windows; killed once the save is published and
  # CKPT_AFTER more windows are logged, before the next save is due: no final save to wait for)
  C="$O/ckpt"; rm -rf "$C"
  mark "ckpt: a background save at step ${CKPT_AT:-200} of $RESUME_CONFIG"
  setsid timeout $(left) $LAMAMBA train --config $RESUME_CONFIG --set 'data.shards="synthetic"' \
    --set "checkpoint.dir=\"$C\"" --set train.micro_batch=$MICRO --set train.global_batch=$MICRO \
    --set train.steps=100000 --set checkpoint.every=${CKPT_AT:-200} --set train.log_every=10 --set train.zero_stage=2 \
    --set 'train.precision="bf16"' --set data.num_workers=${WORKERS:-4} > "$O/ckpt.log" 2>&1 &
  cpid=$!
  while kill -0 $cpid 2>/dev/null; do
    n=$(grep -A${CKPT_AFTER:-5} '"event": "checkpoint"' "$C/stats.jsonl" 2>/dev/null | wc -l)
    [ "$n" -ge $(( ${CKPT_AFTER:-5} + 1 )) ] && break
    sleep 0.2
  done
  kill -9 -- -$cpid 2>/dev/null; wait $cpid 2>/dev/null
  rm -rf "$C"/step_* "$C"/*.tmp-*
  mark "ckpt: done"
fi
if [ "${AB:-0}" = 1 ]; then
  mark "precision A/B"
  timeout ${AB_TIMEOUT:-300} $LAMAMBA bench-train ${AB_CONFIGS:-$CONFIGS} --micro-batch $MICRO \
    --matrix 'precision="bf16","bf16_autocast"' --steps ${AB_STEPS:-200} --warmup 3 --init-on cpu \
    --out "$O/precision_ab.json" > "$O/precision_ab.log" 2>&1
fi

mark "summary"
$PY scripts/gpu_check_summary.py "$O" --micro $MICRO --kill-at ${KILL_AT:-60} --rtol ${RESUME_RTOL:-0.02} \
  | tee "$O/summary.json"
