#!/usr/bin/env bash
# The README's main-job command on a fresh clone: installs what it needs into .venv/ (CPU torch pinned, as
# scripts/test.sh does), then runs `lamamba demo` (procedural data -> tiny VAE -> Ray preprocessing -> DeepSpeed
# ZeRO-2 training on 2 CPU ranks -> sample grid in runs/demo/demo_grid.png). Extra arguments go to `lamamba demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PIP_CACHE_DIR="$ROOT/.cache/pip"
export TORCH_EXTENSIONS_DIR="$ROOT/.cache/torch_extensions"
export DS_ACCELERATOR=cpu
export WANDB_MODE="${WANDB_MODE:-offline}"
PY=python3
command -v "$PY" >/dev/null || PY=python

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "== installing torch 2.13.0 (CPU)"
  .venv/bin/pip install -q torch==2.13.0 -c constraints-cpu.txt
fi
if ! .venv/bin/python -c "import deepspeed, ray, diffusers, webdataset, lamamba_dist" 2>/dev/null; then
  echo "== installing lamamba-dist[data,train]"
  .venv/bin/pip install -q -c constraints-cpu.txt -e '.[data,train]'
fi
exec .venv/bin/lamamba demo "$@"
