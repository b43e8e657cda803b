"""Classifier-free guidance wrapper and per-sample seeding for the samplers.

Guidance (docs/model.md §8): the batch is run once with its labels and once with the null class,
eps = eps_u + s (eps_c - eps_u). The official LaMamba-Diff code guides all 4 latent channels
("all"); DiT guides only the first 3 ("first3"). The variance channels are never guided.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

GUIDANCE_CHANNELS = ("all", "first3")


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed derived from (run seed, global sample index): independent streams per sample."""
    state = np.random.SeedSequence([int(seed) & (2**64 - 1), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample index, seeded by (seed, index)."""
    gens = []
    for i in indices:
        g = torch.Generator(device="cpu")
        g.manual_seed(sample_seed(seed, int(i)))
        gens.append(g)
    return gens


def forward_with_cfg(model, x, t, y, cfg_scale: float, guidance_channels: str = "all") -> torch.Tensor:
    """Classifier-free guidance on a doubled batch (conditional half first, unconditional second): the first
    half of ``x`` is run with both halves' labels, and the guided eps is written to both halves. Guidance applies
    to all latent channels ("all", official LaMamba-Diff) or to the first three ("first3", DiT's sample.py);
    the channels past the latent ones (the variance values) pass through from the conditional half."""
    if guidance_channels not in GUIDANCE_CHANNELS:
        raise ValueError(f"guidance_channels {guidance_channels!r}: choose from {GUIDANCE_CHANNELS}")
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    out = model(combined, t, y)
    n = 3 if guidance_channels == "first3" else x.shape[1]
    eps, rest = out[:, :n], out[:, n:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def cfg_model_fn(model, cfg_scale: float, guidance_channels: str = "all", null_class: int | None = None) -> Callable:
    """A model function ``f(x, t, y) -> out`` on a batch of B samples, guided when cfg_scale > 1.

    With guidance it doubles the batch internally ([x, x], [y, null]), runs :func:`forward_with_cfg` (or the
    model's own ``forward_with_cfg`` method where it defines one) and returns the first half (guided eps +
    conditional v), so the sampler and its per-sample noise only ever see the B real samples. cfg_scale == 1 is a plain
    conditional forward (no doubled batch), as in DiT's sample.py.
    """
    if cfg_scale < 1.0:
        raise ValueError(f"cfg scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    if guidance_channels not in GUIDANCE_CHANNELS:
        raise ValueError(f"guidance_channels {guidance_channels!r}: choose from {GUIDANCE_CHANNELS}")
    if cfg_scale == 1.0:
        return lambda x, t, y: model(x, t, y)
    null = int(model.num_classes if null_class is None else null_class)

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x2 = torch.cat([x, x], dim=0)
        t2 = torch.cat([t, t], dim=0)
        y2 = torch.cat([y, torch.full_like(y, null)], dim=0)
        if hasattr(model, "forward_with_cfg"):
            out = model.forward_with_cfg(x2, t2, y2, cfg_scale, guidance_channels=guidance_channels)
        else:
            out = forward_with_cfg(model, x2, t2, y2, cfg_scale, guidance_channels)
        return out[:B]

    return guided
