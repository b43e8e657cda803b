"""Pieces shared by LaMamba-Diff and DiT: condition embedders and sin-cos position tables."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """t -> 256 sinusoidal features [cos | sin] (cos first, max period 10000) -> Linear, SiLU, Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with a null row (id = num_classes) used for classifier-free guidance.

    In training mode each label is replaced by the null id with probability ``dropout_prob``.
    Unconditional models use num_classes = 0 (one row, always the null id).
    """

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        use_null = dropout_prob > 0 or num_classes == 0
        self.embedding_table = nn.Embedding(num_classes + int(use_null), hidden)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob if num_classes > 0 else 1.0

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        n_rows = self.embedding_table.num_embeddings
        # Checked where it costs no device sync (CPU tensors, eager); CUDA raises its own index assert.
        if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling() \
                and (int(labels.min()) < 0 or int(labels.max()) >= n_rows):
            raise ValueError(f"class labels must be in [0, {n_rows - 1}] (null class = {self.num_classes}); "
                             f"got range [{int(labels.min())}, {int(labels.max())}]")
        return self.embedding_table(labels)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, size: int) -> np.ndarray:
    """(size*size, dim): first half encodes the column, second half the row (MAE / DiT convention)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    return np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
