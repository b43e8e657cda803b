"""In-loop FID during training (lamamba_dist/train/watch.py) and its configuration errors. (The sample grids on 2
ranks, with a kill and a bitwise resume: tests/train/test_train_dist.py.)"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from train_helpers import DEBUG_CONFIG, ROOT, launch, train_env


def _tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(str(path))


def _random_inception(path):
    from lamamba_dist.evaluate import _import_torch_fidelity_inception

    cls = _import_torch_fidelity_inception().FeatureExtractorInceptionV3
    torch.save({}, path.with_name("empty.pth"))
    orig = cls.load_state_dict
    cls.load_state_dict = lambda self, sd, *a, **k: None  # a randomly initialised network
    try:
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path.with_name("empty.pth")))
    finally:
        cls.load_state_dict = orig
    torch.save(net.state_dict(), path)


@pytest.mark.slow
def test_in_loop_fid_on_two_ranks_is_logged(tmp_path):
    """fid_every = 2: at step 2 every rank samples its share of fid_samples, decodes them with the shards' VAE, takes
    Inception features (random weights here: the pipeline, not the value, is under test), rank 0 logs the FID."""
    pytest.importorskip("diffusers")
    try:
        from lamamba_dist.evaluate import _import_torch_fidelity_inception

        _import_torch_fidelity_inception()
    except ImportError:
        pytest.skip("torch-fidelity is not installed (the eval extra)")
    from latent_shards import make_shards

    lat = tmp_path / "latents"
    make_shards(lat, [16, 16], latent=4, num_classes=5)
    _tiny_vae(tmp_path / "vae")
    man = json.loads((lat / "manifest.json").read_text())
    man["vae"] = str(tmp_path / "vae")  # the VAE the shards were made with, as preprocessing records it
    (lat / "manifest.json").write_text(json.dumps(man))
    _random_inception(tmp_path / "inception.pth")
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    run = tmp_path / "run"
    sets = (f'data.shards="{lat}"', "train.steps=2", "train.log_every=1", "train.fid_every=2", "train.fid_samples=6",
            "train.fid_steps=2", f'train.fid_reference="{ref}"', f'train.fid_inception="{tmp_path / "inception.pth"}"')
    res = launch(run, 2, sets)
    assert res.returncode == 0, res.log
    fids = [json.loads(l) for l in (run / "stats.jsonl").read_text().splitlines() if '"fid"' in l]
    assert len(fids) == 1 and fids[0]["step"] == 2 and fids[0]["samples"] == 6, fids
    assert isinstance(fids[0]["fid"], float) and np.isfinite(fids[0]["fid"]) and fids[0]["fid"] > 0
    assert "FID at step 2:" in res.stderr and "not the paper's 50k FID" in res.stderr, res.log


@pytest.mark.parametrize("sets,needle", [
    (("train.fid_every=100",), "fid_every = 100 needs fid_reference"),
    (("train.fid_every=100", 'train.fid_reference="/nowhere/ref.npz"'), "fid_reference = '/nowhere/ref.npz': no such file"),
    (("train.sample_every=10", "train.sample_classes=[0, 10]"), "[10] not in 0..9"),
])
def test_a_bad_watch_setup_is_a_config_error_before_training(tmp_path, sets, needle):
    args = [a for s in sets for a in ("--set", s)]
    res = subprocess.run([sys.executable, "-m", "lamamba_dist.cli", "train", "--config", str(DEBUG_CONFIG), "--set",
                          f'checkpoint.dir="{tmp_path / "run"}"', *args], cwd=ROOT, env=train_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("lamamba train: error:") and needle in last, last
    assert not (tmp_path / "run").exists()  # refused before anything was made
