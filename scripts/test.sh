#!/usr/bin/env bash
# The project's test command (README): installs everything it needs, then runs the suite.
#   - a virtual environment in .venv/ (ignored), torch pinned to the local CPU wheel (constraints-cpu.txt)
#     so that nothing ever pulls a CUDA build;
#   - the package with its data/train/cluster/dev extras;
#   - a one-node Slurm on loopback (cluster/slurm_harness.sh) when we are root and apt exists; stopped on exit;
#   - caches (pip, torch extensions, ray) inside .cache/ (ignored).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k model`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
export WANDB_DIR="$ROOT/.cache/wandb"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
lamamba_venv data,train,cluster,dev
# torch-fidelity (the Inception of `lamamba eval`) without its torchvision dependency, whose PyPI wheel
# does not load against the CPU torch; lamamba_dist.evaluate needs only its torchvision-free module.
if ! .venv/bin/python -c "import torch_fidelity" 2>/dev/null; then
  .venv/bin/pip install -q --no-deps -c constraints-cpu.txt 'torch-fidelity>=0.3'
fi

if [ -x cluster/slurm_harness.sh ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== starting a one-node Slurm on loopback"
    trap 'bash cluster/slurm_harness.sh stop || true' EXIT
    bash cluster/slurm_harness.sh start
  elif [ "${CI:-}" = true ]; then
    echo "CI=true but no root/apt: the Slurm tests cannot run" >&2
    exit 1
  fi
fi

echo "== pytest"
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
exit $rc
