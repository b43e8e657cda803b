"""`lamamba eval`: statistics against independent computations, a stand-in feature network, CLI errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from lamamba_dist.cli import main
from lamamba_dist.evaluate import (
    FeatureExtractor,
    evaluate,
    frechet_distance,
    gaussian_stats,
    inception_score,
    precision_recall,
    run,
)


def _fd_eigen(mu1, s1, mu2, s2):
    """Frechet distance via the symmetric form Tr((S1^1/2 S2 S1^1/2)^1/2), eigh-based: independent of sqrtm(S1 S2)."""
    w, v = linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    ev = linalg.eigvalsh((m + m.T) / 2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def test_frechet_distance_matches_scipy_on_gaussian_features():
    rng = np.random.default_rng(0)
    d = 6
    a = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) + 0.5
    b = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) - 0.2
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    got = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    assert got == pytest.approx(_fd_eigen(mu1, s1, mu2, s2), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    """Population FD of N(m1, diag v1) and N(m2, diag v2) = |m1-m2|^2 + sum (sqrt v1 - sqrt v2)^2."""
    rng = np.random.default_rng(1)
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([0.5, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    a = m1 + rng.normal(size=(200000, 3)) * np.sqrt(v1)
    b = m2 + rng.normal(size=(200000, 3)) * np.sqrt(v2)
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(*gaussian_stats(a), *gaussian_stats(b)) == pytest.approx(want, abs=0.03)


def test_inception_score_extremes():
    k = 10
    uniform = np.zeros((50, k))
    assert inception_score(uniform) == pytest.approx(1.0)
    confident = np.full((50, k), -1e4)
    confident[np.arange(50), np.arange(50) % k] = 0.0  # each sample sure of one class, classes balanced
    assert inception_score(confident) == pytest.approx(k, rel=1e-6)
    # splits: two halves each confined to 5 classes -> 5 per split
    half = np.full((100, k), -1e4)
    half[np.arange(100), np.where(np.arange(100) < 50, np.arange(100) % 5, 5 + np.arange(100) % 5)] = 0.0
    assert inception_score(half, split_size=50) == pytest.approx(5.0, rel=1e-6)
    assert inception_score(half, split_size=100) == pytest.approx(10.0, rel=1e-6)


def test_precision_recall_hand_made_sets():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(60, 4)) * 0.1
    near = rng.normal(size=(30, 4)) * 0.1
    far = rng.normal(size=(30, 4)) * 0.1 + 100.0
    p, r = precision_recall(ref, np.concatenate([near, far]), batch=16)
    assert p == pytest.approx(0.5, abs=0.05)  # the far half is outside the reference manifold
    assert r > 0.8  # most references lie within the near half's 3-NN balls
    p, r = precision_recall(ref, far)
    assert p == 0.0 and r == 0.0
    # batching does not change the answer
    assert precision_recall(ref, near, batch=7) == precision_recall(ref, near, batch=1000)


class TinyFeatures(FeatureExtractor):
    """A fixed random conv net: pool (16), spatial (2x4x4 = 32), logits (10)."""

    name = "tiny stand-in"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.zero_()
        self.fc = torch.randn(16, 10, generator=g)
        self.info = {"name": self.name}

    def __call__(self, images):
        x = images.float() / 127.5 - 1
        with torch.no_grad():
            h = torch.relu(self.conv(x))
            pool = h.mean(dim=(2, 3))
            spatial = torch.nn.functional.adaptive_avg_pool2d(h[:, :2], 4).flatten(1)
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc}


def _npz(path: Path, arr: np.ndarray, **extra) -> Path:
    np.savez(path, arr_0=arr, **extra)
    return path


def _images(seed, n=40, size=16, shift=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=(n, size, size, 3)) + shift
    return np.clip(base, 0, 255).astype(np.uint8)


def test_evaluate_with_stand_in_network(tmp_path):
    ext = TinyFeatures()
    s = _npz(tmp_path / "samples.npz", _images(0))
    r = _npz(tmp_path / "ref.npz", _images(1))
    far = _npz(tmp_path / "far.npz", _images(2, shift=60))
    (tmp_path / "sample_info.json").write_text(json.dumps(dict(model="LaMamba-debug", weights_sha256="ab" * 32, ema=True,
                                                               sampler="ddpm", steps=250, cfg_scale=1.5,
                                                               guidance_channels="all", seed=0, num_samples=40)))
    res = evaluate(s, r, ext, batch_size=16)
    # FID equals the Frechet distance of the stand-in's features, computed independently
    fs = ext(torch.from_numpy(np.load(s)["arr_0"]).permute(0, 3, 1, 2))["pool"].double().numpy()
    fr = ext(torch.from_numpy(np.load(r)["arr_0"]).permute(0, 3, 1, 2))["pool"].double().numpy()
    want = _fd_eigen(fs.mean(0), np.cov(fs, rowvar=False), fr.mean(0), np.cov(fr, rowvar=False))
    assert res["fid"] == pytest.approx(want, rel=1e-5)
    assert res["fid"] > 0 and res["sfid"] > 0 and res["inception_score"] >= 1.0
    assert res["num_samples"] == 40 and res["num_reference"] == 40 and res["resolution"] == 16
    assert len(res["reference_sha256"]) == 64 and res["reference_statistics"] == "computed from its images"
    assert res["sampled_with"]["cfg_scale"] == 1.5 and res["sample_info"]["weights_sha256"] == "ab" * 32
    self_res = evaluate(s, s, ext)
    assert self_res["fid"] == pytest.approx(0.0, abs=1e-6)
    assert self_res["precision"] == 1.0 and self_res["recall"] == 1.0
    assert evaluate(far, r, ext)["fid"] > res["fid"]


def test_evaluate_uses_stored_reference_statistics(tmp_path):
    ext = TinyFeatures()
    s = _npz(tmp_path / "s.npz", _images(0))
    imgs = _images(1)
    feats = ext(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    mu, sigma = gaussian_stats(feats["pool"].numpy())
    mu_s, sigma_s = gaussian_stats(feats["spatial"].numpy())
    plain = evaluate(s, _npz(tmp_path / "r.npz", imgs), ext)
    stored = evaluate(s, _npz(tmp_path / "r2.npz", imgs, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s), ext)
    assert stored["reference_statistics"] == "stored in the reference npz"
    assert stored["fid"] == pytest.approx(plain["fid"], rel=1e-5)
    shifted = evaluate(s, _npz(tmp_path / "r3.npz", imgs, mu=mu + 1.0, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s), ext)
    assert shifted["fid"] > plain["fid"] + 1.0


def _args(samples, ref, **kw):
    return argparse.Namespace(samples=str(samples), reference=str(ref), inception=kw.get("inception"),
                              out=kw.get("out"), batch_size=kw.get("batch_size", 16), device="cpu")


def test_eval_command_writes_json(tmp_path, capsys):
    s = _npz(tmp_path / "samples.npz", _images(0))
    r = _npz(tmp_path / "VIRTUAL_ref.npz", _images(1))
    assert run(_args(s, r), extractor=TinyFeatures()) == 0
    res = json.loads((tmp_path / "eval_VIRTUAL_ref.json").read_text())
    assert {"fid", "sfid", "inception_score", "precision", "recall", "reference_sha256"} <= set(res)
    assert res["sample_info"] is None
    assert "FID" in capsys.readouterr().out


def test_eval_errors(tmp_path, capsys):
    s = _npz(tmp_path / "s.npz", _images(0, size=16))
    r32 = _npz(tmp_path / "r32.npz", _images(1, size=32))
    assert main(["eval", str(s), str(r32), "--inception", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert "holds 32x32 images but the samples" in err and "16x16" in err
    r = _npz(tmp_path / "r.npz", _images(1))
    assert main(["eval", str(s), str(r), "--inception", str(tmp_path / "missing.pth")]) == 2
    assert "Inception weights not found" in capsys.readouterr().err
    assert main(["eval", str(s), str(tmp_path / "nope.npz"), "--inception", "x"]) == 2
    assert "reference file not found" in capsys.readouterr().err
    bad = _npz(tmp_path / "bad.npz", np.zeros((4, 16, 16, 3), dtype=np.float32))
    assert main(["eval", str(bad), str(r), "--inception", "x"]) == 2
    assert "must be uint8" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LAMAMBA_INCEPTION", raising=False)
        assert main(["eval", str(s), str(r)]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err


def test_inception_wrapper_with_random_weights(tmp_path):
    """torch-fidelity's Inception network behind InceptionV3Features: output sizes, spatial hook, local weights only."""
    from lamamba_dist.evaluate import InceptionV3Features, _import_torch_fidelity_inception

    try:
        mod = _import_torch_fidelity_inception()
    except ImportError:
        pytest.skip("torch-fidelity is not installed (the eval extra)")
    cls = mod.FeatureExtractorInceptionV3
    torch.save({}, tmp_path / "empty.pth")
    orig = cls.load_state_dict
    cls.load_state_dict = lambda self, sd, *a, **k: None  # build a randomly initialised network once
    try:
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    finally:
        cls.load_state_dict = orig
    torch.save(net.state_dict(), tmp_path / "random-inception.pth")
    ext = InceptionV3Features(tmp_path / "random-inception.pth")
    imgs = torch.from_numpy(_images(0, n=2, size=32)).permute(0, 3, 1, 2)
    out = ext(imgs)
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 17 * 17 * 7) and out["logits"].shape == (2, 1008)
    assert torch.isfinite(out["pool"]).all() and len(ext.info["weights_sha256"]) == 64
    with pytest.raises(ValueError, match="not loadable"):
        InceptionV3Features(tmp_path / "empty.pth")
