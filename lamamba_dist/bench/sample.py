"""`lamamba bench sample` (alias `lamamba bench-sample`): images/s of DDPM + classifier-free guidance sampling,
several models in one run.

    lamamba bench sample --models LaMamba-XL,DiT-XL/2 --resolution 256,512 --batch 64 --steps 250 \
        --cfg-scale 1.5 --out bench_sample.json

Random weights, no VAE: it times the denoising loop exactly as ``lamamba sample`` runs it
(respaced DDPM, CFG through ``forward_with_cfg`` on a doubled batch, per-sample seeded noise).
For each resolution, every model is measured in the same process, and ``ratio_to_first`` is its
images/s divided by that of the first model listed at that resolution.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from lamamba_dist.bench.common import environment, write_json


def _cli_error(msg: str) -> Exception:
    from lamamba_dist.errors import CLIError

    return CLIError(msg)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(name: str, resolution: int, batch: int, steps: int, cfg_scale: float, device, precision: str = "fp32",
              sampler: str = "ddpm", warmup_steps: int = 2, num_classes: int = 1000, seed: int = 0) -> dict:
    """Build ``name`` with random weights and time one full sampling run of ``batch`` images."""
    import torch

    from lamamba_dist.diffusion import create_diffusion
    from lamamba_dist.models import create_model
    from lamamba_dist.sample import sample_latents

    torch.manual_seed(seed)
    model = create_model(name, resolution=resolution, num_classes=num_classes).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    labels = torch.randint(0, num_classes, (batch,), generator=torch.Generator().manual_seed(seed)).tolist()
    if warmup_steps > 0:  # kernels, autotuning, allocator
        warm = create_diffusion(timestep_respacing=min(warmup_steps, steps))
        sample_latents(model, warm, labels, list(range(batch)), seed, sampler, cfg_scale, "all", device, precision)
    diffusion = create_diffusion(timestep_respacing=steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    z = sample_latents(model, diffusion, labels, list(range(batch)), seed, sampler, cfg_scale, "all", device, precision)
    _sync(device)
    seconds = time.perf_counter() - t0
    finite = bool(torch.isfinite(z).all())
    row = {
        "model": name,
        "resolution": resolution,
        "params": params,
        "seconds": round(seconds, 4),
        "images_per_s": batch / seconds,
        "seconds_per_step": seconds / diffusion.num_timesteps,
        "finite": finite,
    }
    try:
        from lamamba_dist.flops import model_stats

        gmacs = model_stats(name, resolution, num_classes)["gmacs"]
        forwards = batch * diffusion.num_timesteps * (2 if cfg_scale > 1 else 1)
        row["gmacs_per_forward"] = gmacs
        row["achieved_tflops"] = 2 * gmacs * 1e9 * forwards / seconds / 1e12
    except Exception as e:  # the FLOP count is a nicety; the timing stands without it
        row["gmacs_error"] = f"{type(e).__name__}: {e}"
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(
        name,
        help=help_text,
        description="Time DDPM sampling with classifier-free guidance (random weights, no VAE) for several models "
        "in one run and write images/s and the ratio to the first model as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", default="LaMamba-XL,DiT-XL/2", help="comma-separated registry names")
    p.add_argument("--resolution", default="256", help="image side in pixels; a comma list runs each (e.g. 256,512)")
    p.add_argument("--batch", type=int, default=32, help="images sampled at once (the model sees 2x with CFG)")
    p.add_argument("--steps", type=int, default=250, help="DDPM steps (respaced from 1000)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--warmup-steps", type=int, default=2, help="sampling steps run before timing")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="result JSON")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from lamamba_dist.models import MODELS

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise _cli_error("--models is empty")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise _cli_error(f"unknown model(s) {', '.join(unknown)}; valid names: {', '.join(MODELS)}")
    try:
        resolutions = [int(r) for r in str(args.resolution).split(",") if r.strip()]
    except ValueError:
        raise _cli_error(f"--resolution {args.resolution!r}: expected integers such as 256 or 256,512") from None
    bad = [r for r in resolutions if r <= 0 or r % 8]
    if bad or not resolutions:
        raise _cli_error(f"--resolution {args.resolution!r}: each must be a positive multiple of 8")
    if args.batch < 1 or args.steps < 1 or args.steps > 1000:
        raise _cli_error("--batch must be >= 1 and --steps in 1..1000")
    if not args.cfg_scale >= 1.0:
        raise _cli_error(f"--cfg-scale {args.cfg_scale}: must be >= 1")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    from tqdm.auto import tqdm

    rows = []
    jobs = [(r, m) for r in resolutions for m in models]
    for res, name in tqdm(jobs, desc="bench-sample", unit="model"):
        try:
            row = bench_one(name, res, args.batch, args.steps, args.cfg_scale, device, args.precision, args.sampler,
                            args.warmup_steps)
        except (ValueError, KeyError) as e:
            raise _cli_error(f"{name} at {res}px: {e}") from None
        rows.append(row)
        tqdm.write(f"{name:14s} {res:4d}px  {row['images_per_s']:.4f} img/s  ({row['seconds']:.1f} s for {args.batch})")
    for res in resolutions:
        at = [r for r in rows if r["resolution"] == res]
        for r in at:
            r["ratio_to_first"] = r["images_per_s"] / at[0]["images_per_s"]
    result = {
        "bench": "sample",
        "environment": environment(device),
        "benchmark": "DDPM sampling with classifier-free guidance, random weights, latents only (no VAE)",
        "models": models,
        "resolutions": resolutions,
        "batch": args.batch,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "sampler": args.sampler,
        "precision": args.precision,
        "warmup_steps": args.warmup_steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "results": rows,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(args.out)
    write_json(out, result)
    for r in rows:
        print(f"{r['model']:14s} {r['resolution']:4d}px  {r['images_per_s']:.4f} img/s  x{r['ratio_to_first']:.3f}")
    print(f"wrote {out}")
    return 0
