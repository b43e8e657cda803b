"""What a training run is built from: the model, the DeepSpeed engine around it, the diffusion objective and the
parts that act on the engine each step (the fused gradient reduction, the non-finite check, the EMA). The
trainer (trainer.py) builds them with :func:`build_engine` and runs the loop over them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lamamba_dist.errors import TrainingError


def build_model(cfg, device: Optional[torch.device] = None) -> torch.nn.Module:
    """The model of ``[model]`` from the registry (``arch_overrides`` included), seeded by ``[train] seed``.

    ``device=None`` builds on the CPU, as training does (identical initial weights on every rank and every
    machine). Another device builds there directly (much faster for XL-size models; same seed, but the
    device's RNG stream, so other initial weights): what ``lamamba bench-train`` uses.
    """
    from lamamba_dist.config import model_kwargs
    from lamamba_dist.models import create_model

    m = cfg.model
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    try:
        if device is None or device.type == "cpu":
            return create_model(m.name, **model_kwargs(m))
        with torch.device(device):
            return create_model(m.name, **model_kwargs(m))
    except (KeyError, ValueError, TypeError) as e:  # unknown name or arch_overrides field, bad geometry
        raise TrainingError(f"{cfg.source}: [model]: {e}") from None


@dataclass
class EngineParts:
    engine: Any  # deepspeed.DeepSpeedEngine
    ds_config: dict
    accum: int  # micro-batches per optimizer step
    model_dtype: torch.dtype  # the engine's weights: the model input is cast to it, the output back to fp32
    diffusion: Any
    latent_size: int
    class_dropout: float  # drawn per sample by the loader (world-size independent); the model's own is off
    null_class: int
    grads: Any  # ds_internals.FusedGradients, or None for DeepSpeed's own gradient path
    guard: Any  # nonfinite.NonFiniteGuard
    ema: Any  # ema.ZeroEMA
    cudagraphs: bool  # the compiled blocks replay as CUDA graphs ([train] compile_mode, models/compile.py)


def build_engine(cfg, *, rank: int, world: int, on_cuda: bool, device: torch.device, init_on_device: bool,
                 load_universal: bool, info: Callable[[str], None]) -> EngineParts:
    """The model of ``[model]`` (compiled per block with ``[train] compile``) inside a DeepSpeed engine configured
    from ``[train]`` and ``[optim]`` (ds_config.py), with the step's parts around it."""
    import deepspeed

    from lamamba_dist.diffusion import create_diffusion
    from lamamba_dist.models.common import LabelEmbedder
    from lamamba_dist.models.compile import uses_cudagraphs
    from lamamba_dist.train.ds_config import aligned_param_order, build_ds_config
    from lamamba_dist.train.ds_internals import FusedGradients, fused_gradients_unsupported
    from lamamba_dist.train.ema import ZeroEMA
    from lamamba_dist.train.nonfinite import NonFiniteGuard

    t = cfg.train
    model = build_model(cfg, device if init_on_device else None)
    # Class dropout is drawn per sample by the trainer (world-size independent); switch the model's off.
    embedders = [mod for mod in model.modules() if isinstance(mod, LabelEmbedder)]
    class_dropout = float(embedders[0].dropout_prob) if embedders else 0.0
    for mod in embedders:
        mod.dropout_prob = 0.0
    if t.compile:
        if t.zero_stage == 3:
            raise TrainingError(f"{cfg.source}: [train] compile = true is not supported with zero_stage = 3 "
                                "(ZeRO-3 gathers parameters in module hooks that compiled blocks would bypass)")
        from lamamba_dist.models.compile import compile_blocks, use_compile_cache

        cache = use_compile_cache(Path(cfg.checkpoint.dir) / ".compile_cache")
        info(f"torch.compile cache: {cache} (reused by every restart)")
        # regional torch.compile of each block, in place (state-dict keys unchanged)
        compile_blocks(model, mode=t.compile_mode, memory_budget=t.compile_memory_budget, glue=t.compile_glue)
    try:
        ds_config = build_ds_config(t, cfg.optim, world, on_cuda=on_cuda, load_universal=load_universal,
                                    num_params=sum(p.numel() for p in model.parameters()))
    except ValueError as e:
        raise TrainingError(f"{cfg.source}: {e}") from None
    accum = ds_config["gradient_accumulation_steps"]
    # ZeRO-1/2 flatten the weights in this order: 16-byte aligned wherever their sizes allow (ds_config.py).
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=aligned_param_order(model.parameters()),
                                           config=ds_config)
    # ZeRO-1/2: the gradients of a step reduced in one pass, without DeepSpeed's per-parameter hooks
    grads: Optional[FusedGradients] = None
    if t.grad_reduction == "fused":
        why = fused_gradients_unsupported(engine)
        if why is None:
            grads = FusedGradients(engine, accum)
        elif t.zero_stage in (1, 2):
            info(f"gradient reduction: DeepSpeed's per-parameter hooks ({why})")
    return EngineParts(
        engine=engine, ds_config=ds_config, accum=accum,
        model_dtype=torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32,
        diffusion=create_diffusion(cfg.diffusion), latent_size=int(model.latent_size), class_dropout=class_dropout,
        null_class=int(cfg.model.num_classes), grads=grads,
        guard=NonFiniteGuard(engine, world_size=world, device=device),
        ema=ZeroEMA(engine.module, cfg.optim.ema_decay, rank=rank, overlap=cfg.optim.ema_overlap),
        cudagraphs=bool(on_cuda and t.compile and uses_cudagraphs(t.compile_mode)))


def vae_meta(cfg) -> dict:
    """The VAE the latents were made with (from the shard manifest), so samplers decode with the right one."""
    if cfg.data.shards == "synthetic":
        return {}
    try:
        from lamamba_dist.data.reading import resolve_shards

        man = resolve_shards(cfg.data.shards)[0]
        out = {"vae": man.get("vae"), "vae_scale": man.get("scale_factor")}
        return {k: v for k, v in out.items() if v is not None}
    except Exception:  # informative only
        return {}


def flops_per_image(cfg, info: Callable[[str], None]) -> Optional[float]:
    """Training FLOPs per image, 6 x the forward multiply-adds (forward and backward, 2 FLOPs per multiply-add), for
    TFLOP/s and MFU; None (and a line saying so) when unknown."""
    try:
        from lamamba_dist.flops import model_stats

        m = cfg.model
        st = model_stats(m.name, m.resolution, num_classes=m.num_classes, arch_overrides=m.arch_overrides)
        return 6.0 * st["gmacs"] * 1e9
    except Exception as e:  # MFU is informative only
        info(f"model FLOPs unknown ({e}); TFLOP/s and MFU not reported")
        return None
