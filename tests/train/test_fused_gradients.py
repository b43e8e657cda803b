"""ZeRO-1/2 gradients without DeepSpeed's per-parameter hooks (lamamba_dist/train/ds_internals.py: FusedGradients)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUPS = ("1-fp32", "2-fp32", "2-bf16")


@pytest.mark.slow
def test_fused_reduction_is_bitwise_deepspeeds_on_two_ranks(tmp_path):
    """Same gradient partitions, master weights and Adam state as DeepSpeed's own path: ZeRO-1/2, fp32 and bf16,
    2 ranks, 2 micro-batches per step."""
    from train_helpers import train_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "helpers" / "fused_grads_script.py"), *SETUPS]
    res = subprocess.run(cmd, cwd=ROOT, env={**train_env(), "FUSED_RESULTS_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text().splitlines() == [f"FUSED_OK {s} rank{r}" for s in SETUPS]
