"""The diffusion objective and samplers, kept apart from the network (DiT's layout).

Training::

    diffusion = create_diffusion(cfg.diffusion)          # 1000 steps, no respacing
    t = diffusion.sample_t(x.shape[0], x.device)
    losses = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))
    losses["loss"].mean().backward()

Sampling::

    diffusion = create_diffusion(cfg.diffusion, timestep_respacing=250)
    z = diffusion.p_sample_loop(model_fn, (B, 4, S, S), model_kwargs=..., generator=[...])
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from lamamba_dist.diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    get_named_beta_schedule,
    mean_flat,
    randn_like_per_sample,
)
from lamamba_dist.diffusion.respace import SpacedDiffusion, space_timesteps
from lamamba_dist.diffusion.guidance import cfg_model_fn, sample_seed, sample_generators

__all__ = [
    "GaussianDiffusion",
    "SpacedDiffusion",
    "create_diffusion",
    "get_named_beta_schedule",
    "space_timesteps",
    "mean_flat",
    "randn_like_per_sample",
    "cfg_model_fn",
    "sample_seed",
    "sample_generators",
]


def create_diffusion(cfg: Optional[Any] = None, **overrides: Any) -> GaussianDiffusion:
    """Build the diffusion from a ``DiffusionConfig`` section (defaults when None) plus keyword overrides.

    Keywords: any ``DiffusionConfig`` field (num_timesteps, beta_schedule, learn_sigma, ...), and
    ``timestep_respacing`` (None / "" = all T steps, the training setting; an int or "250" = that
    many evenly spaced steps; see :func:`space_timesteps`), ``sigma_small`` (fixed variance choice
    when learn_sigma is false; DiT's default False = fixed_large), ``loss_type`` ("mse").
    """
    from lamamba_dist.config import DiffusionConfig

    cfg = cfg if cfg is not None else DiffusionConfig()
    fields = {f.name for f in dataclasses.fields(cfg)}
    timestep_respacing: Union[None, int, str] = overrides.pop("timestep_respacing", None)
    sigma_small = bool(overrides.pop("sigma_small", False))
    loss_type = overrides.pop("loss_type", "mse")
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"create_diffusion: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)

    betas = get_named_beta_schedule(cfg.beta_schedule, cfg.num_timesteps)
    if cfg.learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    if timestep_respacing in (None, ""):
        timestep_respacing = [cfg.num_timesteps]
    use = space_timesteps(cfg.num_timesteps, timestep_respacing)
    return SpacedDiffusion(use, betas=betas, var_type=var_type, loss_type=loss_type)
