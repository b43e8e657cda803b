# For a GPU machine without network access to a package index: source it in the repository root before any GPU
# command of this repo, e.g.
#   bash scripts/device_env.sh --stage WHEEL_DIR         # where WHEEL_DIR is reachable: copy its wheels into .whl/
#   source scripts/device_env.sh && bash scripts/gpu_check.sh OUT      # on the GPU machine, with .whl/ copied there
# Installs the wheels of .whl/ (mamba-ssm, DeepSpeed, webdataset, ...: the GPU extras of pyproject.toml) into
# /tmp/site without touching the machine's torch and triton, and sets the environment the GPU scripts expect
# (sm_90 builds, unbuffered output; NVLink multicast (NVLS) off in NCCL and symmetric memory).
if [ "${1:-}" = "--stage" ]; then
  src=${2:-${WHEELS:-}}
  if [ -z "$src" ] || ! ls "$src"/*.whl >/dev/null 2>&1; then
    echo "device_env: --stage needs a folder of wheels (bash scripts/device_env.sh --stage WHEEL_DIR, or WHEELS=...)" >&2
    return 2 2>/dev/null || exit 2
  fi
  mkdir -p .whl && cp -u "$src"/*.whl .whl/ && ls .whl | wc -l | xargs echo "staged wheels in .whl/:"
  return 0 2>/dev/null || exit 0
fi
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "device_env: no wheels in .whl/ (run 'bash scripts/device_env.sh --stage WHEEL_DIR' and copy .whl here)" >&2
  return 1 2>/dev/null || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/tmp/site_install.log 2>&1 || { tail -5 /tmp/site_install.log >&2; return 1 2>/dev/null || exit 1; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
