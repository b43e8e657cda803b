"""``lamamba bench vae`` (alias ``lamamba bench-vae``): images/s of the VAE posterior encode of preprocessing
(lamamba_dist/data_pipeline/vae.py ``VaeEncoder``, as ``lamamba preprocess`` runs it), without Ray.

Random-init sd-vae-ft-mse weights unless ``--vae`` (no download needed). Each image is encoded twice (the image and
its horizontal mirror); the time includes the host-to-device copy and the fp16 latents' copy back. ``--fast``
measures cudnn autotuning and channels-last instead of the deterministic kernels preprocessing uses. One row per
resolution and batch, in one process; the JSON is the shape every bench writes (lamamba_dist/bench/common.py).
"""

from __future__ import annotations

import argparse
import time

from lamamba_dist.bench.common import environment, write_json


def bench_vae(resolution: int = 256, batch: int = 64, dtype: str = "bf16", vae: str | None = None,
              device: str | None = None, warmup: int = 3, iters: int = 10, fast: bool = False) -> dict:
    """One row: images/s of the posterior encode of ``batch`` images of ``resolution`` px."""
    import numpy as np
    import torch

    from lamamba_dist.data_pipeline.vae import VaeEncoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    enc = VaeEncoder(vae, device=device, dtype=dtype, encode_batch=batch, deterministic=not fast)
    images = np.random.default_rng(0).integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        enc.encode(images)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        enc.encode(images)
    sync()
    dt = time.perf_counter() - t0
    out = {
        "resolution": resolution, "batch": batch, "dtype": dtype, "device": device,
        "vae": vae or "random-init sd-vae-ft-mse architecture",
        "mode": "fast (cudnn autotune, channels-last)" if fast else "as preprocessing (deterministic kernels, NCHW)",
        "iters": iters, "seconds": dt, "images_per_s": batch * iters / dt,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }
    return out


def run_bench(resolutions: list[int], batches: list[int], dtype: str, vae: str | None, device: str | None,
              warmup: int, iters: int, fast: bool) -> dict:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = [bench_vae(r, b, dtype, vae, device, warmup, iters, fast) for r in resolutions for b in batches]
    return {"bench": "vae", "environment": environment(device),
            "settings": {"dtype": dtype, "vae": vae, "warmup": warmup, "iters": iters, "fast": fast},
            "results": rows}


def _ints(text: str, flag: str) -> list[int]:
    from lamamba_dist.errors import CLIError

    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{flag} {text!r}: give a number or several separated by commas") from None
    if not vals or min(vals) < 1:
        raise CLIError(f"{flag} {text!r}: every value must be >= 1")
    return vals


def add_parser(sub, name: str, help_text: str):
    from lamamba_dist.data_pipeline.vae import DTYPES

    p = sub.add_parser(name, help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", default="256", help="256 or 512, or both separated by a comma")
    p.add_argument("--batch", default="64", help="encode batch, or several separated by commas")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--vae", default=None, help="local AutoencoderKL folder or hub id (default: random init)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--fast", action="store_true", help="cudnn autotuning + channels-last instead of the "
                   "deterministic kernels preprocessing uses")
    p.add_argument("--out", default=None, help="write the JSON here too")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from lamamba_dist.data_pipeline.vae import VaeError
    from lamamba_dist.errors import CLIError

    resolutions = _ints(args.resolution, "--resolution")
    bad = [r for r in resolutions if r not in (256, 512)]
    if bad:
        raise CLIError(f"--resolution {args.resolution!r}: preprocessing supports 256 and 512")
    batches = _ints(args.batch, "--batch")
    if args.iters < 1 or args.warmup < 0:
        raise CLIError("--iters must be >= 1, --warmup >= 0")
    try:
        out = run_bench(resolutions, batches, args.dtype, args.vae, args.device, args.warmup, args.iters, args.fast)
    except VaeError as e:
        raise CLIError(str(e)) from None
    print(write_json(args.out, out, indent=1))
    for r in out["results"]:
        print(f"# VAE encode {r['resolution']}px batch {r['batch']} {r['dtype']}: {r['images_per_s']:.1f} images/s")
    return 0
