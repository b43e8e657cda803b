"""`lamamba demo` end to end with tiny budgets (pipeline check; the README's full run takes ~8 minutes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import ROOT, train_env


@pytest.mark.slow
def test_demo_runs_every_stage_and_leaves_a_grid(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "lamamba_dist.cli", "demo", "--out", str(out), "--per-class", "16", "--vae-steps", "20",
           "--steps", "4", "--sample-steps", "3"]
    res = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    from PIL import Image

    grid = Image.open(out / "demo_grid.png")
    assert grid.width > 4 * 32 and grid.height >= 4 * 32
    assert (out / "latents" / "manifest.json").is_file()  # the real preprocessing ran
    state = json.loads(sorted((out / "run").glob("step_*/trainer_state.json"))[-1].read_text())
    assert state["world_size"] == 2 and state["step"] == 4 and state["zero_stage"] == 2
    assert (out / "samples" / "grid.png").is_file()
    timings = json.loads((out / "demo_timings.json").read_text())
    assert set(timings) >= {"vae", "preprocess", "train", "sample", "total"}
