"""Test helpers: a generated ImageNet-style folder with planted bad images, and a tiny random AutoencoderKL."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Files planted in the folder and what preprocessing must do with them.
PLANTED_SKIPPED = {
    "n00000001/corrupt.JPEG": "not a decodable image",
    "n00000001/truncated.JPEG": "unreadable",
    "n00000002/tiny.JPEG": "too small",
}
PLANTED_CONVERTED = {
    "n00000000/cmyk.JPEG": "CMYK->RGB",
    "n00000002/grey.JPEG": "L->RGB",
    "n00000002/alpha.png": "RGBA->RGB",
    "n00000001/small.JPEG": "upscaled",
}


def make_image_folder(root: Path, per_class: int = 4, classes: int = 3, seed: int = 0, size: int = 80) -> Path:
    """root/train/n0000000{c}/img{i}.JPEG plus the planted files; returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    train = Path(root) / "train"
    for c in range(classes):
        d = train / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(size, size + 60)), int(rng.integers(size, size + 60))
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * (c + 1) * 7) % 256, (yy * (i + 2) * 5) % 256, (xx + yy) % 256], -1)
            arr = np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"img{i}.JPEG", quality=90)
    d0, d1, d2 = (train / f"n{c:08d}" for c in range(3))
    rgb = rng.integers(0, 256, (size + 10, size + 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(d0 / "cmyk.JPEG")
    Image.fromarray(rgb[..., 0]).save(d2 / "grey.JPEG")
    Image.fromarray(np.concatenate([rgb, rgb[..., :1]], -1), "RGBA").save(d2 / "alpha.png")
    Image.fromarray(rgb[:30, :40]).save(d1 / "small.JPEG")
    Image.fromarray(rgb[:6, :6]).save(d2 / "tiny.JPEG")
    (d1 / "corrupt.JPEG").write_bytes(b"\xff\xd8 definitely not a jpeg" * 10)
    full = (d0 / "img0.JPEG").read_bytes()
    (d1 / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    (d1 / "notes.txt").write_text("not an image, ignored")
    (train / "n00000099_empty").mkdir()
    return Path(root)


def make_tiny_vae(path: Path) -> Path:
    """A randomly initialised AutoencoderKL with the real block structure (factor 8, 4 latent channels)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    vae.save_pretrained(str(path))
    return Path(path)
