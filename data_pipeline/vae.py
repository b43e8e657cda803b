"""The VAE encoder used by preprocessing (its throughput: ``lamamba bench vae``, lamamba_dist/bench/vae.py).

Batch-invariant by construction: every forward pass has the same shape (``encode_batch`` images and
their mirrors; a short last batch is padded), and the encoder has no cross-sample operation
(GroupNorm and the mid-block attention are per sample), so a sample's latents do not depend on
which other samples share its batch. That is what makes a killed-and-rerun preprocessing job
produce byte-identical shards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# The sd-vae-ft-mse architecture (its config.json), for random-init benchmarks.
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), act_fn="silu", sample_size=256, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


class VaeError(ValueError):
    pass


def load_vae(vae: str | None, device: str = "cpu", dtype: str = "fp32"):
    """AutoencoderKL from a local folder or hub id; ``None`` = random-init sd-vae-ft-mse architecture."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # "accelerate not found" / "keep in float32" notices are not actionable here
    if vae is None:
        torch.manual_seed(0)
        model = AutoencoderKL(**SD_VAE_CONFIG)
    else:
        looks_local = Path(vae).expanduser().is_absolute() or vae.startswith((".", "~")) or vae.count("/") > 1
        if looks_local and not Path(vae).expanduser().exists():
            raise VaeError(f"cannot load the VAE: folder not found: {vae}")
        try:
            model = AutoencoderKL.from_pretrained(str(Path(vae).expanduser()) if looks_local else vae)
        except Exception as e:
            hint = "" if Path(vae).exists() else " (not a local folder; the hub may be unreachable: pass a downloaded folder)"
            msg = " ".join(str(e).split())  # one line
            raise VaeError(f"cannot load the VAE {vae!r}{hint}: {type(e).__name__}: {msg}") from None
    model.decoder = None  # encoding only: frees half the weights
    model.post_quant_conv = None
    return model.to(device=device, dtype=getattr(torch, DTYPES[dtype])).eval().requires_grad_(False)


def vae_identity(vae: str) -> dict:
    """What the manifest records about the VAE: its id, and the sha256 of local weights."""
    out: dict[str, Any] = {"vae": vae}
    p = Path(vae)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        if files:
            h = hashlib.sha256()
            for f in files:
                h.update(f.read_bytes())
            out["vae_weights_sha256"] = h.hexdigest()
    return out


class VaeEncoder:
    """uint8 images (B, R, R, 3) -> posterior (mean, logvar) of image and mirror, float16 (B, 2, C, R/8, R/8)."""

    def __init__(self, vae: str | None, device: str = "cpu", dtype: str = "fp32", encode_batch: int = 16,
                 threads: int | None = None, deterministic: bool = True):
        import torch

        if threads:
            torch.set_num_threads(threads)
        if device.startswith("cuda"):
            # Deterministic kernels (no autotuning) so that reruns write identical bytes; --fast in bench-vae
            # measures what autotuning and channels-last would add.
            torch.backends.cudnn.benchmark = not deterministic
            torch.backends.cudnn.deterministic = deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.device, self.encode_batch = device, encode_batch
        self.model = load_vae(vae, device, dtype)
        self.channels_last = not deterministic and device.startswith("cuda")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dtype = next(self.model.parameters()).dtype
        self.scaling_factor = float(self.model.config.scaling_factor)

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        n = len(images)
        means, logvars = [], []
        for i in range(0, n, self.encode_batch):
            chunk = images[i:i + self.encode_batch]
            m = len(chunk)
            x = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).contiguous()  # (m, 3, R, R) uint8
            if m < self.encode_batch:  # fixed shape: batch-invariant results
                x = torch.cat([x, x.new_zeros((self.encode_batch - m,) + x.shape[1:])])
            x = torch.cat([x, x.flip(-1)]).contiguous()  # (2b, 3, R, R): images, then their mirrors
            x = x.to(self.device, non_blocking=True).to(self.dtype) / 127.5 - 1.0
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                dist = self.model.encode(x).latent_dist
            mean = dist.mean.float().cpu().numpy()
            logvar = dist.logvar.float().cpu().numpy()
            b = self.encode_batch
            means.append(np.stack([mean[:m], mean[b:b + m]], axis=1).astype(np.float16))
            logvars.append(np.stack([logvar[:m], logvar[b:b + m]], axis=1).astype(np.float16))
        return np.concatenate(means), np.concatenate(logvars)
