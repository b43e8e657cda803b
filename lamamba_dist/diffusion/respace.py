"""Timestep respacing (IDDPM): sample with a subset of the T training steps.

A respaced process keeps alpha_bar at the retained steps and recomputes betas from them,
so q(x_t | x_0) is unchanged at those steps. The model is always called with the
*original* timestep values (``timestep_map``), never the respaced indices (docs/model.md §8).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
import torch

from lamamba_dist.diffusion.gaussian_diffusion import GaussianDiffusion, _table


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> set[int]:
    """Which original steps to keep.

    ``section_counts``: an int or "250" (evenly spaced over one section), a comma list "10,15,20"
    (the T steps cut into equal sections, each strided to its count), or "ddimN" (a fixed integer
    stride giving exactly N steps, as in the DDIM paper). Evenly spaced steps always include 0 and T-1.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} steps from {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",") if x.strip()]
    section_counts = list(section_counts)
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot take {section_count} steps from a section of {size} (T = {num_timesteps})")
        if section_count < 1:
            raise ValueError(f"a section needs at least 1 step, got {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over ``use_timesteps`` of a base process built from ``base_betas``."""

    def __init__(self, use_timesteps: Iterable[int], *, betas: np.ndarray, **kwargs: Any):
        self.use_timesteps = set(int(t) for t in use_timesteps)
        base = GaussianDiffusion(betas=betas, **kwargs)
        self.original_num_steps = base.num_timesteps
        self.timestep_map: list[int] = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        super().__init__(betas=np.array(new_betas, dtype=np.float64), **kwargs)
        self._map = np.array(self.timestep_map, dtype=np.int64)

    def _call_model(self, model: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        # The map as a tensor cached on t's device (a copy from host memory per call would wait for the GPU).
        return model(x, _table(self._map, t.device)[t], **model_kwargs)
