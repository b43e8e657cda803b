# Shared by scripts/test.sh and scripts/demo.sh (sourced, not run): the repo's environment variables and
# `lamamba_venv EXTRAS`, which makes .venv/ with the CPU torch pinned (constraints-cpu.txt: nothing may pull a
# CUDA build) and the package installed with the given extras. Caches live in .cache/ (ignored).
ROOT=$PWD
export PIP_CACHE_DIR="$ROOT/.cache/pip"
export TORCH_EXTENSIONS_DIR="$ROOT/.cache/torch_extensions"
export DS_ACCELERATOR=cpu
export WANDB_MODE="${WANDB_MODE:-offline}"

lamamba_venv() {
  local extras=$1 py=python3
  command -v "$py" >/dev/null || py=python
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$py" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
  fi
  if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    echo "== installing torch 2.13.0 (CPU)"
    .venv/bin/pip install -q torch==2.13.0 -c constraints-cpu.txt
  fi
  local stamp=".venv/.lamamba-installed-${extras//,/-}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "== installing lamamba-dist[$extras]"
    .venv/bin/pip install -q -c constraints-cpu.txt -e ".[$extras]"
    touch "$stamp"
  fi
  .venv/bin/python -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed'"
}
