#!/usr/bin/env bash
# Trainer throughput, memory and scaling on 1 and 2 H200 GPUs, plus the real `lamamba train` elastic 2 -> 1 resume,
# in priority order (d, a, b, e) within about 8 minutes (BUDGET seconds; each part under `timeout`, skipped when time is short):
#   a. 1 GPU:  LaMamba-XL 256 micro 32, ZeRO 0/1/2/3 x activation checkpointing off/on; DiT-XL/2 256 ZeRO-2
#      (+ c on 1 GPU: LaMamba-XL 512 micro 8, ZeRO-2, checkpointing off/on, in the same launch)
#   b. 2 GPUs: LaMamba-XL 256 micro 32, ZeRO 1/2/3 x off/on; DiT-XL/2 ZeRO-2 (+ c on 2 GPUs, same launch)
#   d. `lamamba train` LaMamba-XL 256, ZeRO-2 bf16, micro 32, global batch 64, synthetic latents, log every step:
#      2 GPUs train steps 1-60 (checkpoints at 50 and 60), the step-60 checkpoint is removed, and the same command on
#      1 GPU resumes from step 50 through the universal checkpoint (elastic 2 -> 1) and trains 51-60 again; the
#      per-step losses 51-60 of both world sizes are compared (they must match within bf16 noise). One design for
#      both questions: it trains 50+ steps with ZeRO-2 bf16, saves, and resumes (RESUME_AT=10 TOTAL=20: the
#      steps-11-20 variant, without the 50+ part)
#   e. largest micro-batch (bench-train --fit-batch): LaMamba-XL and LaMamba-XXL (config-only) 256, ZeRO 2/3, 1 and 2 GPUs
#
# Run on the 2-GPU machine from the repository root, torch/deepspeed/mamba_ssm importable (PYTHONPATH):
#   bash scripts/gpu_scaling.sh OUT_DIR            # PARTS=abde (default abcde; c rides with a and b), BUDGET=460
# Writes at most 8 files into OUT_DIR: bench_1gpu.json bench_2gpu.json train_elastic.json fit_1gpu.json
# fit_2gpu.json scaling.md gpu_scaling.log. Checkpoints (~14 GB each) go to WORK (default /tmp/lamamba_gpu_scaling)
# and are deleted at the end. Tables: python3 -m lamamba_dist.cli bench scaling OUT_DIR/*.json --out docs/scaling.md
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_scaling.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-/tmp/lamamba_gpu_scaling}
BUDGET=${BUDGET:-460}          # seconds for everything; parts that would not fit are skipped
PARTS=${PARTS:-abcdef}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-8}
# The experiments. Overridable to try the plumbing on CPU (2 min, no GPU numbers; python3 must be the venv's):
#   ALLOW_CPU=1 ALLOW_REFERENCE_SCAN=1 NGPU=2 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PRECISION=fp32 MICRO=2 MICRO512=2
#   XL_CONFIG=configs/debug.toml XL512_CONFIG=configs/debug.toml DIT_CONFIG=configs/debug.toml
#   XXL_CONFIG=configs/debug.toml WARMUP=1 STEPS=2 BUDGET=900 bash scripts/gpu_scaling.sh /tmp/out
XL=${XL_CONFIG:-configs/lamamba_XL_256.toml}
XL512=${XL512_CONFIG:-configs/lamamba_XL_512.toml}
DITC=${DIT_CONFIG:-configs/dit_xl2_256.toml}
XXL=${XXL_CONFIG:-configs/lamamba_XXL_256.toml}
MICRO=${MICRO:-32}          # per GPU; the elastic runs use global batch 2 x MICRO
MICRO512=${MICRO512:-8}
PRECISION=${PRECISION:-bf16}
RESUME_AT=${RESUME_AT:-50}  # d: checkpoint the 1-GPU run resumes from
TOTAL=${TOTAL:-60}          # d: last step of both runs
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 WANDB_MODE=disabled
export TORCH_CUDA_ARCH_LIST=9.0   # the image's "9.0a" breaks DeepSpeed's op builder
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec > >(tee -a "$OUT/gpu_scaling.log") 2>&1

CLI=(python3 -m lamamba_dist.cli)                                                      # 1 process = a 1-rank group
TR1=(python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m lamamba_dist.cli)
TR2=(python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m lamamba_dist.cli)
TR4=(python3 -m torch.distributed.run --standalone --nproc_per_node 4 -m lamamba_dist.cli)
has() { [[ $PARTS == *$1* ]]; }
part() {  # part NAME CAP_S MIN_S CMD...: run CMD under timeout min(CAP_S, time left), if at least MIN_S are left
  local name=$1 cap=$2 min=$3; shift 3
  local left=$((BUDGET - SECONDS)) t
  t=$((cap < left ? cap : left))
  if ((left < min)); then echo "### $name: SKIPPED, ${left}s of the ${BUDGET}s budget left (needs ${min}s)"; return 99; fi
  echo "### $name: start at ${SECONDS}s, timeout ${t}s: $*"
  timeout --signal=TERM --kill-after=15 "$t" "$@"
  local rc=$?
  echo "### $name: rc $rc at ${SECONDS}s$( ((rc == 124)) && echo ' (TIMED OUT)')"
  return $rc
}
cleanup() {
  rm -rf "$WORK"
  echo "### done in ${SECONDS}s; files: $(ls "$OUT" | tr '\n' ' ')"
}
trap cleanup EXIT

echo "### $(date -u +%FT%TZ) gpu_scaling.sh: OUT=$OUT WORK=$WORK BUDGET=${BUDGET}s PARTS=$PARTS git $(git rev-parse --short HEAD 2>/dev/null)"
python3 - <<'EOF' || { echo "### environment check failed"; exit 2; }
import os, sys, torch
import deepspeed
from lamamba_dist.ops import fused_available
n = torch.cuda.device_count()
print(f"### torch {torch.__version__} deepspeed {deepspeed.__version__} GPUs {n} "
      f"{torch.cuda.get_device_name(0) if n else '-'} fused scan {fused_available()}")
if not n and os.environ.get("ALLOW_CPU") != "1":
    sys.exit("no GPU")
if not fused_available() and os.environ.get("ALLOW_REFERENCE_SCAN") != "1":
    sys.exit("mamba_ssm's selective_scan_cuda does not import: the reference scan is ~1000x slower (ALLOW_REFERENCE_SCAN=1 to go on)")
EOF
NGPU=${NGPU:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
# d trains on EL_FROM GPUs and resumes on EL_TO (4 -> 2 on a 4-GPU machine, 2 -> 1 otherwise)
EL_FROM=${EL_FROM:-$((NGPU >= 4 ? 4 : 2))}
EL_TO=${EL_TO:-$((EL_FROM / 2))}
# On 4 GPUs, part b runs on GPUs 2,3 while d2 resumes on GPUs 0,1 (SIDE_BY_SIDE=0 to run them one after another)
SIDE_BY_SIDE=${SIDE_BY_SIDE:-$((NGPU >= 4 && EL_TO <= 2))}
[[ $PARTS == *b* && $PARTS == *d* ]] || SIDE_BY_SIDE=0
TRF=(python3 -m torch.distributed.run --standalone --nproc_per_node "$EL_FROM" -m lamamba_dist.cli)
TRT=(python3 -m torch.distributed.run --standalone --nproc_per_node "$EL_TO" -m lamamba_dist.cli)
rm -rf "$WORK"; mkdir -p "$WORK"

# Rows run in the order of the --matrix flags: the LaMamba-XL matrix, then DiT-XL/2, then c (512 px).
BENCH=(bench-train --config "$XL" --micro-batch "$MICRO" --warmup "$WARMUP" --steps "$STEPS")
DIT=(--matrix "config=$DITC;zero=2;gc=false")
C_MATRIX=()
has c && C_MATRIX=(--matrix "config=$XL512;micro=$MICRO512;zero=2;gc=false,true")

# ---------------------------------------------------------------- d: real `lamamba train`, elastic 2 -> 1, 50+ steps
elastic_summary() {
  XL=$XL MICRO=$MICRO PRECISION=$PRECISION RESUME_AT=$RESUME_AT TOTAL=$TOTAL EL_FROM=$EL_FROM EL_TO=$EL_TO python3 - "$WORK/elastic" "$OUT/train_elastic.json" "$WORK"/train_*.log <<'EOF'
import json, math, os, re, statistics, sys
from pathlib import Path
run, out, logs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
recs = []
if (run / "stats.jsonl").is_file():
    recs = [json.loads(l) for l in (run / "stats.jsonl").read_text().splitlines() if l.strip()]
steps = [r for r in recs if "event" not in r]
by = {}
for r in steps:
    by.setdefault((r["step"], r["world_size"]), r)
rows = []
WF, WT = int(os.environ["EL_FROM"]), int(os.environ["EL_TO"])
lo, hi = int(os.environ["RESUME_AT"]) + 1, int(os.environ["TOTAL"])
for s in range(lo, hi + 1):
    a, b = by.get((s, WF)), by.get((s, WT))
    if a and b and a.get("loss") is not None and b.get("loss") is not None:
        rows.append({"step": s, f"loss_{WF}gpu": a["loss"], f"loss_{WT}gpu_resumed": b["loss"],
                     "abs_diff": abs(a["loss"] - b["loss"]), "rel_diff": abs(a["loss"] - b["loss"]) / abs(a["loss"])})
first = [r["loss"] for r in steps if r["world_size"] == WF and lo <= r["step"] <= hi and r.get("loss") is not None]
spread = statistics.pstdev(first) if len(first) > 1 else None
mx = max((r["rel_diff"] for r in rows), default=None)
text = "\n".join(Path(l).read_text(errors="replace") for l in logs if Path(l).is_file())
grab = lambda pat: [m.group(0).strip() for m in re.finditer(pat, text)]
def mean_ips(ws, lo, hi):
    v = [r["img_per_s"] for r in steps if r["world_size"] == ws and lo <= r["step"] <= hi and r.get("img_per_s")]
    return sum(v) / len(v) if v else None
state = {}
for p in sorted(run.glob("step_*/trainer_state.json")):
    st = json.loads(p.read_text())
    state[p.parent.name] = {k: st.get(k) for k in ("step", "images_seen", "world_size", "zero_stage", "precision", "global_batch")}
res = {
    "what": f"lamamba train {os.environ['XL']} ZeRO-2 {os.environ['PRECISION']}, micro {os.environ['MICRO']}, global "
            f"batch {WF * int(os.environ['MICRO'])}, synthetic latents: {WF} GPUs train steps 1-{hi} (checkpoints at "
            f"{lo - 1} and {hi}; step {hi} removed), then the same command on {WT} GPU(s) resumes from step {lo - 1} "
            f"through the universal checkpoint (elastic {WF} -> {WT}) and trains steps {lo}-{hi} again",
    "world_sizes": [WF, WT],
    "compared_steps": [lo, hi],
    "loss_after_resume": rows,
    "max_rel_diff": mx,
    "loss_std_2gpu": spread,
    "match": None if mx is None else bool(mx < 0.01),
    "last_step_logged": max((r["step"] for r in steps), default=None),
    "nonfinite_events": [r for r in recs if "event" in r],
    "all_losses_finite": all(r.get("loss") is None or math.isfinite(r["loss"]) for r in steps),
    f"img_per_s_{WF}gpu": mean_ips(WF, 3, hi),            # real trainer, log intervals of 1 step (first 2 skipped)
    f"img_per_s_{WT}gpu_accum2": mean_ips(WT, lo + 2, hi),
    "peak_mem_gib": {str(ws): max((r.get("peak_mem_gib") or 0) for r in steps if r["world_size"] == ws)
                     for ws in (WF, WT) if any(r["world_size"] == ws for r in steps)},
    "resume_lines": grab(r"resumed from [^\n]*"),
    "elastic_lines": grab(r"elastic resume: [^\n]*") + grab(r"universal checkpoint written in [0-9.]+s"),
    "saved_lines": grab(r"saved \S+ in [0-9.]+s"),
    "checkpoints_left_before_cleanup": state,
    "stats": steps,
}
out.write_text(json.dumps(res, indent=1) + "\n")
print(f"### elastic: steps {lo}-{hi} max relative loss difference {WF} GPUs vs resumed on {WT}: {mx} "
      f"(step-to-step std {spread}); last step {res['last_step_logged']}; resumes: {len(res['resume_lines'])}")
EOF
}
if has d && ((NGPU >= 2)); then
  RUN="$WORK/elastic"
  TRAIN=(train --config "$XL" --set 'data.shards="synthetic"' --set "checkpoint.dir=\"$RUN\""
         --set train.micro_batch="$MICRO" --set train.global_batch=$((EL_FROM * MICRO)) --set train.zero_stage=2
         --set "train.precision=\"$PRECISION\""
         --set model.grad_checkpointing=false --set train.log_every=1 --set checkpoint.keep=2
         --set 'checkpoint.verify="size"' --set logging.wandb=false)
  if part "d1: train $EL_FROM GPUs, steps 1-$TOTAL" 150 150 "${TRF[@]}" "${TRAIN[@]}" --set train.steps="$TOTAL" \
       --set checkpoint.every="$RESUME_AT" 2>&1 | tee "$WORK/train_1.log"; then
    rm -rf "$RUN/step_$(printf %08d "$TOTAL")"   # the 1-GPU run resumes from step RESUME_AT
    if ((SIDE_BY_SIDE)); then  # b on the other half of the GPUs while d2 resumes on the first half
      CUDA_VISIBLE_DEVICES=2,3 part "b: 2 GPU bench (GPUs 2,3, beside d2)" 160 60 "${TR2[@]}" "${BENCH[@]}" \
        --matrix "zero=1,2,3;gc=false,true" "${DIT[@]}" "${C_MATRIX[@]}" --out "$OUT/bench_2gpu.json" &
      B_PID=$!
      export CUDA_VISIBLE_DEVICES=0,1
    fi
    part "d2: elastic resume $EL_FROM -> $EL_TO GPU, steps $((RESUME_AT + 1))-$TOTAL" 170 80 "${TRT[@]}" "${TRAIN[@]}" \
      --set train.steps="$TOTAL" --set checkpoint.every="$RESUME_AT" 2>&1 | tee "$WORK/train_2.log"
    unset CUDA_VISIBLE_DEVICES
    [[ -n ${B_PID:-} ]] && wait "$B_PID"
  fi
  elastic_summary
  rm -rf "$RUN"/step_* "$RUN"/.universal
fi

# ---------------------------------------------------------------- a (+ c): one GPU, one process
if has a; then
  part "a: 1 GPU bench" 170 60 "${CLI[@]}" "${BENCH[@]}" --matrix "zero=0,1,2,3;gc=false,true" "${DIT[@]}" \
    "${C_MATRIX[@]}" --out "$OUT/bench_1gpu.json"
fi

# ---------------------------------------------------------------- b (+ c): two GPUs
if has b && ((NGPU >= 2)) && [[ -z ${B_PID:-} ]]; then
  part "b: 2 GPU bench" 160 60 "${TR2[@]}" "${BENCH[@]}" --matrix "zero=1,2,3;gc=false,true" "${DIT[@]}" \
    "${C_MATRIX[@]}" --out "$OUT/bench_2gpu.json"
fi

# ---------------------------------------------------------------- f: four GPUs (ZeRO-2 rows first)
if has f && ((NGPU >= 4)); then
  part "f: 4 GPU bench" 160 60 "${TR4[@]}" "${BENCH[@]}" --matrix "zero=2,1,3;gc=false,true" "${DIT[@]}" \
    "${C_MATRIX[@]}" --out "$OUT/bench_4gpu.json"
fi

# ---------------------------------------------------------------- e: largest micro-batch, if time remains
FIT=(bench-train --config "$XL" --config "$XXL" --matrix "zero=2,3"
     --fit-batch --fit-probes 16,32)
if has e; then
  part "e1: fit 1 GPU" 150 60 "${CLI[@]}" "${FIT[@]}" --out "$OUT/fit_1gpu.json"
  ((NGPU >= 2)) && part "e2: fit 2 GPUs" 150 60 "${TR2[@]}" "${FIT[@]}" --out "$OUT/fit_2gpu.json"
fi
exit 0
