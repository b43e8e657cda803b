"""Dry-run build of an experiment: model on the meta device (no allocation) and the DeepSpeed config."""

from __future__ import annotations

import json


def dry_run(cfg, world_size: int = 1) -> str:
    """Build everything that can be built without memory or processes; return a one-paragraph summary."""
    import torch

    from lamamba_dist.config import model_kwargs
    from lamamba_dist.diffusion import create_diffusion
    from lamamba_dist.models import create_model
    from lamamba_dist.train.ds_config import build_ds_config

    m = cfg.model
    with torch.device("meta"):
        model = create_model(m.name, **model_kwargs(m))
    params = sum(p.numel() for p in model.parameters())
    # The smallest world size the batch layout allows is 1; report the config for that one.
    ds = build_ds_config(cfg.train, cfg.optim, world_size, on_cuda=False)
    create_diffusion(cfg.diffusion)
    arch = f" {m.arch_overrides}" if m.arch_overrides else ""
    return (f"{cfg.source}: {m.name}{arch} @ {m.resolution}px (latent {model.latent_size}), {params / 1e6:.1f}M params, "
            f"ZeRO-{cfg.train.zero_stage} {cfg.train.precision}, global batch {cfg.train.global_batch}, "
            f"{cfg.train.steps} steps, checkpoints in {cfg.checkpoint.dir}\n"
            f"deepspeed config (world size {world_size}): {json.dumps(ds, sort_keys=True)}")
