"""`lamamba sample` end to end: tiny random VAE, LaMamba-debug weights, PNGs/grid/npz, 1 vs 2 ranks, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lamamba_dist.cli import main

ROOT = Path(__file__).resolve().parents[2]
RES = 32  # pixels: latent 4x4, the smallest LaMamba-debug accepts


def _make_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=RES,
    )
    vae.save_pretrained(str(path))


def _make_weights(path: Path, **meta) -> None:
    from lamamba_dist.models import create_model
    from lamamba_dist.weights import save_weights

    torch.manual_seed(0)
    model = create_model("LaMamba-debug", resolution=RES, num_classes=10)
    with torch.no_grad():  # leave adaLN-zero: random weights everywhere make samples depend on labels and noise
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_weights(path, model.state_dict(),
                 dict(dict(model="LaMamba-debug", resolution=RES, num_classes=10, learn_sigma=True, ema=True), **meta))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample_assets")
    _make_vae(d / "vae")
    _make_weights(d / "w.safetensors")
    return d


def _sample_args(assets, out, *extra):
    return ["sample", "--weights", str(assets / "w.safetensors"), "--vae", str(assets / "vae"),
            "--steps", "5", "--out", str(out), *extra]


def test_sample_end_to_end(assets, tmp_path):
    out = tmp_path / "s"
    rc = main(_sample_args(assets, out, "--num-samples", "5", "--batch-size", "2", "--classes", "1,7", "--seed", "3"))
    assert rc == 0
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    data = np.load(out / "samples.npz")
    arr, labels = data["arr_0"], data["arr_1"]
    assert arr.shape == (5, RES, RES, 3) and arr.dtype == np.uint8
    assert labels.tolist() == [1, 7, 1, 7, 1]
    assert len({arr[i].tobytes() for i in range(5)}) == 5  # every sample differs
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(pngs[2])), arr[2])
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * (RES + 2) + 2, 3 * (RES + 2) + 2, 3)  # 5 images -> 3 per row, 2 rows, 2 px padding
    info = json.loads((out / "sample_info.json").read_text())
    for k, v in dict(model="LaMamba-debug", sampler="ddpm", steps=5, cfg_scale=1.5, guidance_channels="all", seed=3,
                     num_samples=5, ema=True, world_size=1, vae_scale=0.18215).items():
        assert info[k] == v, k
    assert len(info["weights_sha256"]) == 64 and len(info["weights_file_sha256"]) == 64
    assert info["labels"] == [1, 7, 1, 7, 1]


def test_sample_same_seed_same_images_any_batching(assets, tmp_path):
    """Sample i depends on (seed, i) and the fixed global batches: DDIM, random classes, no CFG."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["--num-samples", "4", "--batch-size", "2", "--sampler", "ddim", "--cfg-scale", "1", "--no-png"]
    assert main(_sample_args(assets, a, *common, "--seed", "11")) == 0
    assert main(_sample_args(assets, b, *common, "--seed", "11")) == 0
    assert main(_sample_args(assets, c, *common, "--seed", "12")) == 0
    A, B, C = (np.load(p / "samples.npz") for p in (a, b, c))
    np.testing.assert_array_equal(A["arr_0"], B["arr_0"])
    assert not np.array_equal(A["arr_0"], C["arr_0"])
    assert not (a / "images").exists() or not list((a / "images").glob("*.png"))


def _torchrun(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """torchrun in its own process group, killed as a whole on timeout (no orphaned ranks)."""
    import signal

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "lamamba_dist.cli", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun --nproc_per_node {nproc} timed out after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_same_seed_same_images_on_1_and_2_ranks(assets, tmp_path):
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"r{n}"
        p = _torchrun(n, _sample_args(assets, out, "--num-samples", "5", "--batch-size", "2", "--seed", "5",
                                      "--cfg-scale", "2.0"))
        assert p.returncode == 0, p.stderr[-3000:]
        runs[n] = out
    one, two = (np.load(runs[n] / "samples.npz") for n in (1, 2))
    np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
    np.testing.assert_array_equal(one["arr_1"], two["arr_1"])
    assert sorted(p.name for p in (runs[2] / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    info = json.loads((runs[2] / "sample_info.json").read_text())
    assert info["world_size"] == 2 and info["num_samples"] == 5


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cfg-scale", "0.5"], "--cfg-scale 0.5: must be >= 1"),
        (["--sampler", "euler"], "unknown sampler"),
        (["--classes", "3,42"], "out of range"),
        (["--steps", "0"], "--steps 0"),
    ],
)
def test_sample_bad_arguments(assets, tmp_path, capsys, extra, message):
    rc = main(_sample_args(assets, tmp_path / "x", *extra))
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "samples.npz").exists()


def test_sample_missing_inputs(assets, tmp_path, capsys, monkeypatch):
    assert main(["sample", "--checkpoint", str(tmp_path / "nope"), "--vae", str(assets / "vae"), "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["sample", "--weights", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "weights file not found" in capsys.readouterr().err
    # an empty run folder: no complete checkpoint
    (tmp_path / "run").mkdir()
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--vae", str(assets / "vae"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot load EMA weights" in capsys.readouterr().err
    # no VAE anywhere, and a VAE that cannot be loaded
    assert main(["sample", "--weights", str(assets / "w.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "no VAE" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(_sample_args(assets, tmp_path / "o2", "--vae", "someone/not-a-local-vae")) == 2
    err = capsys.readouterr().err
    assert "cannot load the VAE 'someone/not-a-local-vae'" in err and "offline" in err


def test_sample_refuses_to_overwrite_and_checks_ema(assets, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(_sample_args(assets, out, "--num-samples", "1", "--no-png")) == 0
    assert main(_sample_args(assets, out, "--num-samples", "1")) == 2
    assert "already holds samples" in capsys.readouterr().err
    assert main(_sample_args(assets, tmp_path / "t", "--num-samples", "1", "--no-ema")) == 2
    assert "holds EMA weights" in capsys.readouterr().err


def test_sample_from_training_run_folder(assets, tmp_path, monkeypatch):
    """--checkpoint goes through train.checkpoint.load_inference_weights (stubbed here to the exported file)."""
    import lamamba_dist.train.checkpoint as ck
    from lamamba_dist.weights import load_weights

    calls = []

    def fake_load(run_dir, ema=True, verify=True, warn=None):
        calls.append((Path(run_dir), ema, verify))
        sd, meta = load_weights(assets / "w.safetensors")
        return sd, dict(meta, step=7, ema=ema, checkpoint=str(Path(run_dir) / "step_00000007"))

    monkeypatch.setattr(ck, "load_inference_weights", fake_load)
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run), "--no-ema", "--vae", str(assets / "vae"), "--steps", "2",
                 "--num-samples", "2", "--out", str(out), "--no-png"]) == 0
    assert calls == [(run, False, True)]
    info = json.loads((out / "sample_info.json").read_text())
    assert info["source"] == "checkpoint" and info["ema"] is False and info["step"] == 7
