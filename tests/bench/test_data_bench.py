"""bench-loader / bench-vae commands, and shard selection by pattern."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latent_shards import make_shards

ROOT = Path(__file__).resolve().parents[2]
LAMAMBA = [sys.executable, "-c", "import sys; from lamamba_dist.cli import main; sys.exit(main())"]


def test_bench_loader_cli(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([*LAMAMBA, "bench-loader", "--workers", "0,2", "--batches", "3", "--samples", "64",
                        "--shard-size", "16", "--micro-batch", "4", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [x["num_workers"] for x in res["results"]] == [0, 2]
    for x in res["results"]:
        assert x["samples"] == 12 and x["samples_per_s"] > 0
        assert x["samples_per_s_per_worker"] == pytest.approx(x["samples_per_s"] / max(1, x["num_workers"]))
    r = subprocess.run([*LAMAMBA, "bench-loader", "--workers", "x"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--workers 'x'" in r.stderr


def test_bench_vae_cpu_with_local_vae(tmp_path):
    from image_folder import make_tiny_vae

    vae = make_tiny_vae(tmp_path / "vae")
    out = tmp_path / "vae.json"
    r = subprocess.run([*LAMAMBA, "bench", "vae", "--vae", str(vae), "--device", "cpu", "--batch", "1,2",
                        "--dtype", "fp32", "--warmup", "1", "--iters", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["bench"] == "vae" and res["environment"]["device"] == "cpu"
    assert [(x["resolution"], x["batch"]) for x in res["results"]] == [(256, 1), (256, 2)]
    assert all(x["images_per_s"] > 0 and x["vae"] == str(vae) for x in res["results"])
    r = subprocess.run([*LAMAMBA, "bench-vae", "--vae", str(tmp_path / "missing"), "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "cannot load the VAE" in r.stderr.strip().splitlines()[-1]


@pytest.mark.gpu
def test_bench_vae_gpu_bf16():
    from lamamba_dist.bench.vae import bench_vae

    res = bench_vae(resolution=256, batch=8, dtype="bf16", device="cuda", warmup=1, iters=2)
    assert res["images_per_s"] > 0 and res["peak_memory_gib"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_encoder_batch_invariant_on_gpu(dtype):
    """Byte-identical reruns on GPU need a sample's latents not to depend on its batch neighbours."""
    import numpy as np

    from lamamba_dist.data_pipeline.vae import VaeEncoder

    enc = VaeEncoder(None, device="cuda", dtype=dtype, encode_batch=8)
    x = np.random.default_rng(0).integers(0, 256, (11, 256, 256, 3), dtype=np.uint8)
    mean, logvar = enc.encode(x)
    for i in (0, 5, 10):
        m1, l1 = enc.encode(x[i:i + 1])
        assert np.array_equal(m1[0], mean[i]) and np.array_equal(l1[0], logvar[i]), i
    again, _ = enc.encode(x)
    assert np.array_equal(again, mean)


def test_shard_pattern_selects_a_subset(tmp_path):
    from lamamba_dist.config import DataConfig
    from lamamba_dist.data import DataError, build_latent_loader

    keys = make_shards(tmp_path, [4, 4, 4])
    cfg = DataConfig(shards=str(tmp_path / "train-00000{0,2}.tar"), num_workers=0, num_streams=2)
    ld = build_latent_loader(cfg, micro_batch=2, rank=0, world_size=1, seed=0, latent_size=4)
    seen = [k for b in itertools.islice(iter(ld), 4) for k in b["key"]]
    assert sorted(seen) == sorted(keys[:4] + keys[8:])
    assert ld.samples_per_epoch == 8
    (tmp_path / "train-000009.tar").write_bytes(b"")
    with pytest.raises(DataError, match="train-000009.tar is not listed"):
        build_latent_loader(DataConfig(shards=str(tmp_path / "*.tar"), num_workers=0, num_streams=2),
                            micro_batch=2, rank=0, world_size=1, seed=0, latent_size=4)
