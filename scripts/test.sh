#!/usr/bin/env bash
# The project's test command (README): installs everything it needs, then runs the suite.
#   - a virtual environment in .venv/ (ignored), torch pinned to the local CPU wheel (constraints-cpu.txt)
#     so that nothing ever pulls a CUDA build;
#   - the package with its data/train/cluster/dev extras;
#   - a one-node Slurm on loopback (cluster/slurm_harness.sh) when we are root and apt exists, for the suite;
#     then a two-node one (network namespaces) for the `multinode` tests; stopped on exit;
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

slurm=0
if [ -x cluster/slurm_harness.sh ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    slurm=1
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
.venv/bin/python -m pytest -q -m "not multinode" "$@"
rc=$?
set -e
if [ "$slurm" = 1 ] && [ "${LAMAMBA_MULTINODE:-1}" != 0 ]; then
  echo "== the two-node Slurm (network namespaces) for the multinode tests"
  bash cluster/slurm_harness.sh stop
  bash cluster/slurm_harness.sh start --nodes 2
  set +e
  LAMAMBA_MULTINODE_REQUIRED=1 .venv/bin/python -m pytest -q -m multinode "$@"
  rc2=$?
  set -e
  [ "$rc2" = 5 ] && rc2=0  # none selected (a -k that matches none of them)
  [ "$rc" = 0 ] && rc=$rc2
  # nothing may stay behind: no daemon, namespace, link or hosts entry of the harness
  bash cluster/slurm_harness.sh stop
  left="$(ip netns list 2>/dev/null | grep '^lamamba-node' || true; ip -o link show 2>/dev/null | grep -E 'lmb-h|lamamba-br' || true;
          grep '# lamamba slurm harness' /etc/hosts || true; pgrep -af "$ROOT/.cache/slurm" || true)"
  if [ -n "$left" ]; then
    echo "the Slurm harness left this behind after stop:" >&2
    echo "$left" >&2
    rc=1
  fi
fi
exit $rc
