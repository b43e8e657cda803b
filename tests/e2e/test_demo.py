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
    # the run's report (lamamba report), pointed at by the final message
    run = out / "run"
    assert f"the run's report: {run / 'report.html'}" in res.stderr, res.stderr[-2000:]
    rep = json.loads((run / "report.json").read_text())["summary"]
    assert rep["last_step"] == 4 and rep["checkpoints"] >= 1 and rep["sample_grids"] == [
        str(run / "samples" / "step_00000004_final.png")], rep
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 6 and "checkpoint step_00000004" in page


@pytest.mark.slow
def test_demo_runs_from_another_folder_with_a_normal_install(tmp_path):
    """`pip install .` (not editable) into a fresh venv, then `lamamba demo --out <relative path>` from a folder that
    is not the repository: nothing may depend on the checkout, and relative paths follow the user's cwd."""
    import os

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    env = {**os.environ, "PIP_CACHE_DIR": str(ROOT / ".cache" / "pip")}  # the wheels scripts/test.sh downloaded
    env.pop("PYTHONPATH", None)
    pip = [str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints-cpu.txt")]
    for args in (["torch==2.13.0"], [f"{ROOT}[data,train]"]):
        res = subprocess.run([*pip, *args], env=env, capture_output=True, text=True, timeout=1500)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(py), "-c", "import lamamba_dist, lamamba_dist.data_pipeline, lamamba_dist.cluster; "
                            "print(lamamba_dist.__file__); print(lamamba_dist.data_pipeline.__file__); "
                            "print(lamamba_dist.cluster.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.returncode == 0 and all(str(venv) in line for line in where.stdout.split()), where.stdout + where.stderr
    # installed inside our namespace only: a user's own top-level `cluster` / `data_pipeline` cannot collide with ours
    for name in ("cluster", "data_pipeline"):
        res = subprocess.run([str(py), "-c", f"import {name}"], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, (name, res.stdout, res.stderr)
    run_env = {**train_env(), "PIP_CACHE_DIR": env["PIP_CACHE_DIR"]}
    run_env.pop("PYTHONPATH", None)
    res = subprocess.run([str(venv / "bin" / "lamamba"), "demo", "--out", "rel/demo", "--per-class", "16",
                          "--vae-steps", "10", "--steps", "2", "--sample-steps", "2"], cwd=elsewhere, env=run_env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    out = elsewhere / "rel" / "demo"
    assert (out / "demo_grid.png").is_file() and (out / "run" / "step_00000002" / "COMPLETE.json").is_file()
    assert not (ROOT / "rel").exists()


def test_the_demo_config_carried_in_the_package_is_configs_demo_toml():
    from lamamba_dist.demo import DEMO_TOML

    assert DEMO_TOML == (ROOT / "configs" / "demo.toml").read_text()
