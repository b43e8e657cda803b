# Source on a GPU machine (the device tool's H200s) before any GPU command of this repo:
#   source scripts/device_env.sh && bash scripts/perf_probe.sh $OUT
# Installs the wheels carried in .whl/ (stage them here first with `bash scripts/device_env.sh --stage`)
# into /tmp/site without touching the machine's torch/triton, and sets the environment the scripts expect.
# NVLink multicast stays off (the machines' rule): NCCL_NVLS_ENABLE=0 and friends are exported again.
if [ "${1:-}" = "--stage" ]; then  # on the workstation: copy the shared device wheels into the ignored .whl/
  src=${WHEELS:-"$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/../shared/wheels/device"}
  mkdir -p .whl && cp -u "$src"/*.whl .whl/ && ls .whl | wc -l | xargs echo "staged wheels in .whl/:"
  return 0 2>/dev/null || exit 0
fi
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "device_env: no wheels in .whl/ (run 'bash scripts/device_env.sh --stage' here and carry .whl)" >&2
  return 1 2>/dev/null || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/tmp/site_install.log 2>&1 || { tail -5 /tmp/site_install.log >&2; return 1 2>/dev/null || exit 1; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
