"""The fused non-finite check (lamamba_dist/train/nonfinite.py) on every DeepSpeed optimizer path, 2 CPU ranks."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lamamba_dist.train.ds_internals import UnsupportedDeepSpeed, check_deepspeed_version

ROOT = Path(__file__).resolve().parents[2]

# (setup, the optimizer DeepSpeed builds for it; bf16 at ZeRO-0 runs as bf16_autocast: fp32 weights, ds_config.py)
SETUPS = {"0-fp32": "torch", "0-bf16": "torch", "1-fp32": "zero12", "1-bf16": "bf16",
          "2-fp32": "zero12", "2-bf16": "zero12", "3-fp32": "zero3", "3-bf16": "zero3",
          # ZeRO-1/2 as the trainer runs them: gradients through FusedGradients (train/ds_internals.py)
          "1-fp32-fused": "zero12", "2-fp32-fused": "zero12", "2-bf16-fused": "zero12"}
# Where the skip happens: on the device (torch's fused AdamW's found_inf, the verdict read after engine.step())
# for a plain torch optimizer and ZeRO-1/2's; on the host (before engine.step()) for ZeRO-3 and BF16_Optimizer.
ON_DEVICE = {"torch": "device", "zero12": "device", "zero3": "host", "bf16": "host"}


def test_deepspeed_version_outside_the_tested_range_is_refused():
    assert check_deepspeed_version()  # the installed one is in range
    for v in ("0.18.9", "0.19.7", "0.20.0", "1.0.0"):
        with pytest.raises(UnsupportedDeepSpeed, match=r"deepspeed>=0\.19\.8,<0\.20\.0"):
            check_deepspeed_version(v)
    assert check_deepspeed_version("0.19.9+abc") == "0.19.9+abc"


@pytest.mark.slow
def test_nonfinite_loss_or_grad_on_one_rank_skips_the_step_on_every_optimizer_path(tmp_path):
    from train_helpers import train_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "helpers" / "nonfinite_script.py"), *SETUPS]
    env = {**train_env(), "NONFINITE_RESULTS_DIR": str(tmp_path)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    norms: dict[str, list[float]] = {}
    for r in (0, 1):
        lines = (tmp_path / f"rank{r}.txt").read_text().splitlines()
        assert len(lines) == len(SETUPS), (r, lines)
        for line, (setup, kind) in zip(lines, SETUPS.items()):
            m = re.fullmatch(rf"NONFINITE_OK {setup} {kind} {ON_DEVICE[kind]} (\S+) rank{r}", line)
            assert m, (line, setup, kind)
            norms.setdefault(setup, []).append(float(m.group(1)))
    for setup, (n0, n1) in norms.items():
        assert n0 == n1, f"{setup}: ranks disagree on the global grad norm ({n0} vs {n1})"
    # The same first step everywhere: every path reports the same global norm (not a rank's part, not world x it)
    ref = norms["0-fp32"][0]
    for setup, (n, _) in norms.items():
        tol = 1e-4 if "-fp32" in setup else 3e-2  # bf16 compute
        assert abs(n - ref) <= tol * ref, f"{setup}: grad norm {n} vs {ref} (ZeRO-0 fp32)"


@pytest.mark.slow
def test_zero2_without_contiguous_gradient_buffer_is_bitwise_the_same(tmp_path):
    """ds_config.py turns DeepSpeed's contiguous gradient buffer off (CPU cost per parameter): same gradients and
    weights, bitwise, on 2 ranks, fp32 and bf16."""
    from train_helpers import train_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "helpers" / "contiguous_grads_script.py"), "fp32", "bf16"]
    res = subprocess.run(cmd, cwd=ROOT, env={**train_env(), "CONTIG_RESULTS_DIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text().splitlines() == [f"CONTIG_OK fp32 rank{r}",
                                                                        f"CONTIG_OK bf16 rank{r}"]
