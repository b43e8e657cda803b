"""One registry of model sizes, one line per size. Resolution is in pixels (latent side = resolution // 8)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from lamamba_dist.models.dit import DiT
from lamamba_dist.models.lamamba import LaMambaArch, LaMambaDiff
from lamamba_dist.weights import load_weights, strip_wrapper_prefixes

VAE_FACTOR = 8
RESOLUTIONS = (256, 512)  # the paper's; any multiple of 32 px works for LaMamba (latent divisible by 4)

# name -> (family, architecture kwargs)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    # LaMamba-Diff: XL is the official configuration; S/B/L scale its width only (docs/model.md §9).
    "LaMamba-XL": ("lamamba", dict(base_width=320, num_heads=16)),
    "LaMamba-L": ("lamamba", dict(base_width=264, num_heads=12)),
    "LaMamba-B": ("lamamba", dict(base_width=144, num_heads=12)),
    "LaMamba-S": ("lamamba", dict(base_width=72, num_heads=6)),
    # Tiny debug size: the configuration of the recorded official outputs (tests/helpers/official_vectors.py TINY) (window 4, 2 heads, depths 1/1/1/1 + 1).
    "LaMamba-debug": ("lamamba", dict(base_width=32, depths=(1, 1, 1, 1), mid_depth=1, num_heads=2, window_size=4)),
    **{
        f"DiT-{size}/{p}": ("dit", dict(depth=d, hidden_size=h, num_heads=nh, patch_size=p))
        for size, (d, h, nh) in {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}.items()
        for p in (2, 4, 8)
    },
    "DiT-debug/2": ("dit", dict(depth=2, hidden_size=64, num_heads=2, patch_size=2)),
}


def list_models() -> list[str]:
    return list(MODELS)


def create_model(name: str, resolution: int = 256, num_classes: int = 1000, class_dropout: float = 0.1,
                 learn_sigma: bool = True, grad_checkpointing: bool = False, scan_backend: str = "auto",
                 attn_backend: str = "auto", lean_scan_backward: bool = True, conv_backend: str = "auto",
                 snake_backend: str = "auto", scan_core: str = "auto", **arch_overrides) -> nn.Module:
    """Build a registered model. ``arch_overrides`` replace architecture fields (e.g. depths=(2,2,2,2)).
    ``lean_scan_backward`` (LaMamba, fused/Triton scan kernels): the SS2D backward keeps the map, not its four
    snake copies and deltas (lamamba_dist.ops.ss2d_core); False = plain autograd, for A/B measurements.
    ``conv_backend`` (LaMamba): SS2D's depthwise conv + SiLU (lamamba_dist.ops.dwconv). ``snake_backend`` (LaMamba):
    the merge of the four scan directions and its adjoint (lamamba_dist.ops.cross_scan.SNAKE_BACKENDS). ``scan_core``
    (LaMamba): how the lean scan core reaches autograd (lamamba_dist.ops.ss2d_core.CORES)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if resolution % VAE_FACTOR:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor {VAE_FACTOR}")
    family, arch = MODELS[name]
    arch = {**arch, **arch_overrides}
    common = dict(input_size=resolution // VAE_FACTOR, num_classes=num_classes, class_dropout=class_dropout,
                  learn_sigma=learn_sigma, grad_checkpointing=grad_checkpointing)
    if family == "lamamba":
        valid = {f.name for f in dataclasses.fields(LaMambaArch) if f.init}
        bad = sorted(set(arch) - valid)
        if bad:
            raise ValueError(f"unknown LaMamba architecture field(s) {bad}; valid: {sorted(valid)}")
        model = LaMambaDiff(LaMambaArch(**arch), scan_backend=scan_backend, attn_backend=attn_backend,
                            lean_scan_backward=lean_scan_backward, conv_backend=conv_backend,
                            snake_backend=snake_backend, scan_core=scan_core, **common)
    else:
        model = DiT(**arch, **common)
    model.model_name = name
    return model


def load_state_dict_strict(model: nn.Module, state_dict: dict, source: str = "state dict") -> None:
    """Load all parameters, refusing missing or unexpected keys (named) and shape mismatches."""
    state_dict = strip_wrapper_prefixes(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
        raise KeyError(f"{source} does not match {getattr(model, 'model_name', type(model).__name__)}: " + "; ".join(parts))
    bad = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if state_dict[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: shape mismatch for {len(bad)} key(s): " + "; ".join(bad[:10]))
    model.load_state_dict(state_dict, strict=True)


def build_from_weights(path, device="cpu"):
    """Build the registered model described by the file's metadata and load its weights strictly."""
    sd, meta = load_weights(path)
    model = create_model(
        meta["model"],
        resolution=int(meta["resolution"]),
        num_classes=int(meta["num_classes"]),
        learn_sigma=bool(meta.get("learn_sigma", True)),
        **{k: tuple(v) if isinstance(v, list) else v for k, v in (meta.get("arch_overrides") or {}).items()},
    )
    load_state_dict_strict(model, sd, source=str(path))
    return model.to(device).eval(), meta
