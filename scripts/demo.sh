#!/usr/bin/env bash
# The README's main-job command on a fresh clone: installs what it needs into .venv/ (CPU torch pinned, as
# scripts/test.sh does), then runs `lamamba demo` (procedural data -> tiny VAE -> Ray preprocessing -> DeepSpeed
# ZeRO-2 training on 2 CPU ranks -> sample grid in runs/demo/demo_grid.png). Extra arguments go to `lamamba demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
lamamba_venv data,train
exec .venv/bin/lamamba demo "$@"
