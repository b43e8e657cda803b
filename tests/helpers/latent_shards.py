"""Test helper: write small latent shards in the preprocess format without Ray or a VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lamamba_dist.data.shards import encode_sample, sample_key, shard_name, write_json_atomic, write_tar_atomic


def make_shards(folder: Path, counts: list[int], latent: int = 4, num_classes: int = 5, seed: int = 0,
                logvar: float | None = None) -> list[str]:
    """Shards with ``counts[i]`` samples each; returns all keys. Mean of sample i is filled with i (orig) / -i (flip)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys, shards, idx = [], [], 0
    for si, c in enumerate(counts):
        members = []
        hist: dict[str, int] = {}
        for _ in range(c):
            key = sample_key(idx, f"n{idx % num_classes:08d}", f"img{idx}")
            mean = np.empty((2, 4, latent, latent), np.float32)
            mean[0], mean[1] = idx, -idx
            lv = rng.normal(-2, 0.5, mean.shape) if logvar is None else np.full(mean.shape, logvar)
            members += encode_sample(key, mean, lv, idx % num_classes, {"path": f"x/{idx}.JPEG", "label": idx % num_classes})
            keys.append(key)
            hist[str(idx % num_classes)] = hist.get(str(idx % num_classes), 0) + 1
            idx += 1
        name = shard_name("train", si)
        sha, size = write_tar_atomic(folder / name, members)
        shards.append({"name": name, "count": c, "sha256": sha, "bytes": size, "class_histogram": hist})
    write_json_atomic(folder / "manifest.json", {"format_version": 1, "shards": shards, "scale_factor": 0.5,
                                                 "latent_shape": [2, 4, latent, latent], "resolution": latent * 8,
                                                 "num_classes": num_classes, "complete": True})
    return keys
