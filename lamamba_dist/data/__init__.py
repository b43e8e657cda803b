"""Training data: the resumable latent loader over preprocessed WebDataset shards (see loader.py)."""

from lamamba_dist.data.loader import DataError, LatentLoader, build_latent_loader

__all__ = ["DataError", "LatentLoader", "build_latent_loader"]
