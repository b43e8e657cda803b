"""`lamamba parity`: does the fast path train like the reference path? Loss curves on fixed data.

Kernel parity tests compare one forward/backward; this compares whole training runs. The same model is
built three times from the same initial weights and trained for ``--steps`` AdamW steps of the plain training step
(lamamba_dist/train/step.py; on GPUs by default in ``lamamba train``'s precision: bf16 weights, fp32 master
weights) on one fixed, learnable dataset (class-dependent smooth latent patterns):

* ``fast``       the candidate kernels (default: the auto backends of the scan, attention and depthwise conv);
* ``reference``  the pure-PyTorch kernels (literal scan recurrence, explicit attention, ATen conv), with exactly the same
                 per-step batches, timesteps and noise as ``fast``: any gap comes from the kernels alone;
* ``noise``      the fast kernels again with different per-step draws (batches, timesteps, noise): the
                 run-to-run noise of the loss curve, the yardstick of "within noise".

Curves are smoothed by a trailing mean (``--window`` steps); over the second half of training the mean relative
gap fast-vs-reference must not exceed the fast-vs-noise gap. The JSON keeps every per-step loss.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from lamamba_dist.ops.dwconv import CONV_BACKENDS
from lamamba_dist.ops.selective_scan import BACKENDS as SCAN_BACKENDS
from lamamba_dist.ops.window_attention import BACKENDS as ATTN_BACKENDS
from lamamba_dist.train.step import PRECISIONS, TrainStep
import torch.nn.functional as F


def fixed_dataset(n: int, latent: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` latents (n, 4, s, s) and labels: a smooth random pattern per class (4x4 upsampled) plus a small
    per-sample perturbation, so the loss can fall well below its initial value within a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.randn(num_classes, 4, 4, 4, generator=g), size=(latent, latent), mode="bilinear",
                           align_corners=False)
    labels = torch.arange(n) % num_classes
    x = protos[labels] + 0.1 * torch.randn(n, 4, latent, latent, generator=g)
    return x, labels


def train_curve(model_name: str, resolution: int, batch: int, steps: int, device: torch.device, precision: str,
                scan_backend: str, attn_backend: str, init_seed: int, draw_seed: int, lr: float = 1e-4,
                num_classes: int = 10, pool: int = 256, conv_backend: str = "auto") -> list[float]:
    """Per-step training losses of one run. Weights depend on ``init_seed`` only; batches, timesteps and
    noise on ``draw_seed`` only (drawn on the CPU, so the draws are the same on every device and backend)."""
    from lamamba_dist.diffusion import create_diffusion
    from lamamba_dist.models import create_model

    torch.manual_seed(init_seed)
    model = create_model(model_name, resolution=resolution, num_classes=num_classes, class_dropout=0.0,
                         scan_backend=scan_backend, attn_backend=attn_backend, conv_backend=conv_backend).to(device)
    model.train()
    diffusion = create_diffusion()
    step = TrainStep(model, diffusion, precision, lr=lr, weight_decay=0.0)  # lamamba_dist/train/step.py
    data, labels = fixed_dataset(pool, model.latent_size, num_classes, seed=1234)
    g = torch.Generator().manual_seed(draw_seed)
    losses = []
    for i in range(steps):
        idx = torch.randint(0, pool, (batch,), generator=g)
        t = diffusion.sample_t(batch, "cpu", generator=g)
        noise = torch.randn(batch, *data.shape[1:], generator=g)
        loss = step(data[idx].to(device), t.to(device), labels[idx].to(device), noise.to(device))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{model_name} ({scan_backend} scan, {attn_backend} attention, {conv_backend} conv): "
                                     f"loss {value} at step {i}")
        losses.append(value)
    return losses


def smooth(curve: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (shorter at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(curve):
        acc += v
        if i >= window:
            acc -= curve[i - window]
        out.append(acc / min(i + 1, window))
    return out


def relative_gap(a: list[float], b: list[float], window: int) -> float:
    """Mean |smooth(a) - smooth(b)| over the second half, relative to the mean of smooth(b) there."""
    if len(a) != len(b) or not a:
        raise ValueError(f"curves of different or zero length: {len(a)} vs {len(b)}")
    sa, sb = smooth(a, window), smooth(b, window)
    half = len(a) // 2
    diff = sum(abs(x - y) for x, y in zip(sa[half:], sb[half:])) / (len(a) - half)
    return diff / (sum(sb[half:]) / (len(a) - half))


def compare(fast: list[float], reference: list[float], noise: list[float], window: int) -> dict:
    gap = relative_gap(fast, reference, window)
    yardstick = relative_gap(fast, noise, window)
    k = min(window, len(fast))
    return dict(gap_fast_vs_reference=gap, gap_fast_vs_noise_run=yardstick, within_noise=gap <= yardstick,
                first_step_abs_diff=abs(fast[0] - reference[0]),
                loss_first=sum(reference[:k]) / k, loss_last=sum(reference[-k:]) / k)


def run_parity(model: str, resolution: int, batch: int, steps: int, device: str | None = None,
               precision: str | None = None, fast_backends: tuple[str, ...] = ("auto", "auto", "auto"),
               reference_backends: tuple[str, ...] = ("reference", "reference", "torch"), window: int = 20,
               lr: float = 1e-4, seed: int = 0) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
    common = dict(model_name=model, resolution=resolution, batch=batch, steps=steps, device=dev,
                  precision=precision, init_seed=seed, lr=lr)
    curves = {}
    for name, backends, draw in (("fast", fast_backends, seed + 1), ("reference", reference_backends, seed + 1),
                                 ("noise", fast_backends, seed + 2)):
        scan, attn, conv = (tuple(backends) + ("auto", "auto", "auto"))[:3]  # (scan, attention[, conv])
        print(f"# parity {model}: {name} run ({scan} scan, {attn} attention, {conv} conv), {steps} steps ...",
              flush=True)
        curves[name] = train_curve(scan_backend=scan, attn_backend=attn, conv_backend=conv, draw_seed=draw, **common)
    result = compare(curves["fast"], curves["reference"], curves["noise"], window)
    return dict(model=model, resolution=resolution, batch=batch, steps=steps, precision=precision, lr=lr,
                window=window, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                torch=torch.__version__, fast_backends=list(fast_backends), reference_backends=list(reference_backends),
                **result, curves=curves)


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="LaMamba-debug")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=20, help="trailing-mean window of the smoothed curves")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the step's precision (lamamba_dist/train/step.py): bf16 (bf16 weights, fp32 master weights, "
                        "as `lamamba train`), bf16_autocast or fp32; default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--scan-backend", choices=SCAN_BACKENDS, default="auto",
                   help="scan kernel of the fast run")
    p.add_argument("--attn-backend", choices=ATTN_BACKENDS, default="auto",
                   help="attention kernel of the fast run")
    p.add_argument("--conv-backend", choices=CONV_BACKENDS, default="auto",
                   help="SS2D's depthwise conv + SiLU of the fast run (the reference run: torch)")
    p.add_argument("--out", default=None, help="write the JSON (with every per-step loss) here")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from lamamba_dist.errors import CLIError
    from lamamba_dist.models import MODELS

    if args.model not in MODELS:
        raise CLIError(f"unknown model {args.model!r}; valid names: {', '.join(MODELS)}")
    if args.steps < 2 or args.batch < 1 or args.window < 1:
        raise CLIError("--steps must be >= 2, --batch and --window >= 1")
    out = run_parity(args.model, args.resolution, args.batch, args.steps, args.device, args.precision,
                     (args.scan_backend, args.attn_backend, args.conv_backend), window=args.window, lr=args.lr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out) + "\n")
    print(f"# {out['model']} {out['precision']}: loss {out['loss_first']:.4f} -> {out['loss_last']:.4f}; "
          f"gap fast vs reference {100 * out['gap_fast_vs_reference']:.3f}%, run-to-run noise "
          f"{100 * out['gap_fast_vs_noise_run']:.3f}%: {'within' if out['within_noise'] else 'OUTSIDE'} noise")
    return 0 if out["within_noise"] else 1
