"""Parameter and forward multiply-add accounting (`lamamba flops`).

Counts matmuls and convolutions with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no
memory, no compute) and divides by 2, the convention of the DiT and LaMamba-Diff papers ("GFLOPs" there are
multiply-adds). The scan's elementwise recurrence is not a matmul and is not counted, as in the papers.
"""

from __future__ import annotations

import functools
import json

import torch
from torch.utils.flop_counter import FlopCounterMode


# Dense bf16 matmul peak per GPU, for MFU: ~790 TFLOP/s on an H100/H200 (the rate measured on an H200; the
# datasheet says 989). The trainer's status line and `lamamba bench` both use this table.
PEAK_BF16_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU named ``device_name`` (``torch.cuda.get_device_name``), None if unknown."""
    for key, val in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return val
    return None


def _hashable(v):
    return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


def model_stats(name: str, resolution: int, num_classes: int = 1000, arch_overrides: dict | None = None) -> dict:
    """{"params": int, "gmacs": float} for one image's forward pass (``arch_overrides``: as ``create_model``'s)."""
    arch = tuple(sorted((k, _hashable(v)) for k, v in (arch_overrides or {}).items()))
    return dict(_model_stats(name, resolution, num_classes, arch))


@functools.lru_cache(maxsize=None)
def _model_stats(name: str, resolution: int, num_classes: int, arch: tuple) -> dict:
    from lamamba_dist.models import create_model

    with torch.device("meta"):
        model = create_model(name, resolution=resolution, num_classes=num_classes,
                             scan_backend="reference", attn_backend="reference", **dict(arch)).eval()
        s = model.latent_size
        x = torch.empty(1, model.in_channels, s, s)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long)
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y)
    return {"model": name, "resolution": resolution, "params": params, "gmacs": counter.get_total_flops() / 2 / 1e9}


def train_flops_per_image(name: str, resolution: int, num_classes: int = 1000,
                          arch_overrides: dict | None = None) -> float:
    """Model FLOPs of one training step per image: forward + backward = 3 x forward, 2 FLOPs per MAC."""
    return 6.0 * model_stats(name, resolution, num_classes, arch_overrides)["gmacs"] * 1e9


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text, description="Print parameters and forward multiply-adds per image.")
    p.add_argument("--model", required=True, help="registry name, e.g. LaMamba-XL or DiT-XL/2 (see `lamamba models`)")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = resolution / 8)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from lamamba_dist.errors import CLIError
    from lamamba_dist.models import MODELS

    if args.model not in MODELS:
        raise CLIError(f"unknown model {args.model!r}; valid names: {', '.join(MODELS)}")
    try:
        stats = model_stats(args.model, args.resolution, args.num_classes)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"{stats['model']} @ {stats['resolution']}px: {stats['params']:,} parameters, "
              f"{stats['gmacs']:.2f} G multiply-adds per image (forward)")
    return 0
