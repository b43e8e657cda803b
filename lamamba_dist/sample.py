"""`lamamba sample`: class-conditional sampling on one or many ranks, written as PNGs, a grid and an ADM npz.

    lamamba sample --weights model.safetensors --num-samples 16 --cfg-scale 1.5 --out samples/
    torchrun --nproc_per_node 8 -m lamamba_dist.cli sample --checkpoint runs/xl256 --num-samples 50000 \
        --classes random --cfg-scale 1.5 --steps 250 --batch-size 64 --out fid50k/

Reproducibility: sample ``i`` (global index) uses labels[i] and a generator seeded by
(--seed, i) for its initial noise and every DDPM step's noise, and samples are batched in
fixed global batches of --batch-size (batch k goes to rank k % world_size), so the same
command gives the same images whatever the number of ranks. Everything that made the
samples goes to ``sample_info.json``; ``lamamba eval`` copies it into its result.

Outputs (rank 0 writes the npz, grid and info; each rank writes its own PNGs):
    OUT/images/000000.png ...   one per sample, named by global index
    OUT/grid.png                the first --grid samples
    OUT/samples.npz             arr_0: uint8 (N, H, W, 3), arr_1: int64 labels (ADM evaluator format)
    OUT/sample_info.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from lamamba_dist.distributed import setup_distributed, teardown_distributed
from lamamba_dist.hashing import sha256_file

DEFAULT_VAE_SCALE = 0.18215
SAMPLERS = ("ddpm", "ddim")


def _cli_error(msg: str) -> Exception:
    from lamamba_dist.errors import CLIError

    return CLIError(msg)


# --------------------------------------------------------------------------- model / vae loading


def state_dict_sha256(sd: dict) -> str:
    """Hash of a state dict: sorted keys, dtype, shape and raw bytes (independent of file layout)."""
    import torch

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_sampling_model(weights: Optional[str], checkpoint: Optional[str], ema: Optional[bool], device,
                        verify: bool = True) -> tuple[Any, dict, dict]:
    """Model (eval mode, on ``device``), its metadata, and provenance fields for sample_info.json.

    A ``checkpoint`` is verified against its COMPLETE.json as resume does (``verify=False`` skips it, loudly)."""
    from lamamba_dist.models import create_model, load_state_dict_strict

    if (weights is None) == (checkpoint is None):
        raise _cli_error("give exactly one of --weights FILE.safetensors or --checkpoint RUN_DIR")
    prov: dict[str, Any] = {}
    if weights is not None:
        from lamamba_dist.weights import load_weights

        p = Path(weights)
        if not p.is_file():
            raise _cli_error(f"weights file not found: {p}")
        try:
            sd, meta = load_weights(p)
        except (ValueError, FileNotFoundError) as e:
            raise _cli_error(str(e)) from None
        file_ema = meta.get("ema")
        if ema is not None and file_ema is not None and bool(file_ema) != ema:
            raise _cli_error(
                f"{p} holds {'EMA' if file_ema else 'raw (non-EMA)'} weights but --{'ema' if ema else 'no-ema'} was given; "
                "export the other weights or drop the flag"
            )
        prov.update(source="weights", weights=str(p.resolve()), weights_file_sha256=sha256_file(p),
                    ema=None if file_ema is None else bool(file_ema))
    else:
        p = Path(checkpoint)
        if not p.exists():
            raise _cli_error(f"checkpoint not found: {p} (expected a training run folder or one of its step folders)")
        try:
            from lamamba_dist.train.checkpoint import load_inference_weights
        except ImportError as e:
            raise _cli_error(f"--checkpoint needs lamamba_dist.train.checkpoint.load_inference_weights, "
                             f"which this installation lacks ({e}); export weights and use --weights") from None
        use_ema = True if ema is None else ema
        import sys

        warn = lambda msg: print(f"lamamba sample: WARNING: {msg}", file=sys.stderr)  # noqa: E731
        if not verify:
            warn("--no-verify: the weights are NOT checked against the checkpoint's COMPLETE.json; a damaged file "
                 "samples silently")
        try:
            sd, meta = load_inference_weights(p, ema=use_ema, verify=verify, warn=warn)
        except ImportError:
            raise
        except Exception as e:  # CheckpointError, FileNotFoundError, ValueError: all user-facing
            raise _cli_error(f"cannot load {'EMA' if use_ema else 'raw'} weights from {p}: {e}") from None
        prov.update(source="checkpoint", checkpoint=str(meta.get("checkpoint", p)), ema=use_ema, verified=verify)
        for k in ("step", "images_seen", "ema_decay"):
            if k in meta:
                prov[k] = meta[k]
    for k in ("model", "resolution", "num_classes"):
        if k not in meta:
            raise _cli_error(f"{p}: metadata lacks {k!r}")
    try:
        arch = {k: tuple(v) if isinstance(v, list) else v for k, v in (meta.get("arch_overrides") or {}).items()}
        model = create_model(meta["model"], resolution=int(meta["resolution"]), num_classes=int(meta["num_classes"]),
                             learn_sigma=bool(meta.get("learn_sigma", True)), **arch)
        load_state_dict_strict(model, sd, source=str(p))
    except (KeyError, ValueError) as e:
        raise _cli_error(str(e).strip("'\"")) from None
    prov["weights_sha256"] = state_dict_sha256(sd)
    prov.update(model=meta["model"], resolution=int(meta["resolution"]), num_classes=int(meta["num_classes"]),
                learn_sigma=bool(meta.get("learn_sigma", True)))
    return model.to(device).eval(), meta, prov


def load_vae(path_or_id: str, device):
    """A diffusers AutoencoderKL from a local folder or a hub id; a clear error when it cannot be loaded."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise _cli_error(f"decoding latents needs diffusers (pip install 'lamamba-dist[data]'): {e}") from None
    local = Path(path_or_id)
    try:
        if local.exists():
            vae = AutoencoderKL.from_pretrained(str(local), low_cpu_mem_usage=False)
        else:
            # The local cache first (fast, works offline); the hub only when HF_HUB_OFFLINE is not set.
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
            try:
                vae = AutoencoderKL.from_pretrained(path_or_id, low_cpu_mem_usage=False, local_files_only=True)
            except Exception:
                if offline:
                    raise
                vae = AutoencoderKL.from_pretrained(path_or_id, low_cpu_mem_usage=False)
    except Exception as e:
        where = "local folder" if local.exists() else "hub id (no such local folder)"
        raise _cli_error(
            f"cannot load the VAE {path_or_id!r} as a {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "This machine may be offline: download the VAE elsewhere (e.g. stabilityai/sd-vae-ft-mse) and pass --vae LOCAL_DIR"
        ) from None
    return vae.to(device).eval()


# --------------------------------------------------------------------------- sampling core


def parse_classes(text: Optional[str], num_classes: int, num_samples: Optional[int], seed: int) -> list[int]:
    """Labels for every sample: a comma list (repeated cyclically to --num-samples) or random (seeded)."""
    import torch

    if text is not None and text.strip().lower() not in ("", "random"):
        try:
            cls = [int(c) for c in text.split(",") if c.strip()]
        except ValueError:
            raise _cli_error(f"--classes {text!r}: expected comma-separated integers or 'random'") from None
        if not cls:
            raise _cli_error("--classes is empty")
        bad = [c for c in cls if not 0 <= c < max(num_classes, 1)]
        if bad:
            raise _cli_error(f"--classes: {bad} out of range for a model with {num_classes} classes (0..{num_classes - 1})")
        n = num_samples if num_samples is not None else len(cls)
        return [cls[i % len(cls)] for i in range(n)]
    n = num_samples if num_samples is not None else 16
    if num_classes == 0:
        return [0] * n
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, num_classes, (n,), generator=g).tolist()


def rank_batches(num_samples: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Fixed global batches of sample indices; batch k belongs to rank k % world (None-padded rounds)."""
    batches = [list(range(s, min(s + batch_size, num_samples))) for s in range(0, num_samples, batch_size)]
    return [b for k, b in enumerate(batches) if k % world == rank]


def sample_latents(
    model,
    diffusion,
    labels: Sequence[int],
    indices: Sequence[int],
    seed: int,
    sampler: str = "ddpm",
    cfg_scale: float = 1.5,
    guidance_channels: str = "all",
    device="cpu",
    precision: str = "fp32",
    on_step: Optional[Callable[[], None]] = None,
):
    """Latents (B, C, S, S) fp32 for the given global sample indices and labels."""
    import torch

    from lamamba_dist.diffusion import cfg_model_fn, sample_generators

    device = torch.device(device)
    fn = cfg_model_fn(model, cfg_scale, guidance_channels)
    if precision == "bf16":
        inner = fn

        def fn(x, t, y):  # noqa: F811 - autocast wrapper, the sampler arithmetic stays fp32
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                return inner(x, t, y).float()

    B = len(indices)
    shape = (B, model.in_channels, model.latent_size, model.latent_size)
    y = torch.tensor(list(labels), dtype=torch.long, device=device)
    gens = sample_generators(seed, indices)
    kwargs = dict(model_kwargs=dict(y=y), device=device, generator=gens, clip_denoised=False)
    if sampler == "ddpm":
        it = diffusion.p_sample_loop_progressive(fn, shape, **kwargs)
    elif sampler == "ddim":
        it = diffusion.ddim_sample_loop_progressive(fn, shape, **kwargs)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    out = None
    with torch.inference_mode():
        for out in it:
            if on_step is not None:
                on_step()
    return out["sample"]


def decode_to_uint8(vae, z, scale: float):
    """VAE-decode latents and map [-1, 1] -> uint8 NHWC (DiT's sample_ddp.py rounding)."""
    import torch

    with torch.inference_mode():
        x = vae.decode(z / scale).sample
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def make_grid(images, nrow: Optional[int] = None, pad: int = 2):
    """uint8 (N, H, W, 3) -> one uint8 image, ``nrow`` images per row, white padding."""
    import numpy as np

    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = images[i]
    return grid


def _save_png(arr, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)


# --------------------------------------------------------------------------- command


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(
        name,
        help=help_text,
        description="Sample class-conditional images from exported weights or a training run (EMA by default). "
        "Runs under torchrun on many ranks; the same --seed gives the same images for any number of ranks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("model")
    src.add_argument("--weights", help="inference weights (.safetensors written by lamamba export / save_weights)")
    src.add_argument("--checkpoint", help="training run folder (newest complete checkpoint) or one of its step folders")
    src.add_argument("--no-verify", action="store_true",
                     help="with --checkpoint: do not check its files against COMPLETE.json (damaged weights then load "
                          "without an error)")
    src.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                     help="use the EMA weights (default: yes; for --weights, must match what the file holds)")
    g = p.add_argument_group("sampling")
    g.add_argument("--classes", default="random", help="comma-separated class ids (repeated to --num-samples) or 'random'")
    g.add_argument("--num-samples", type=int, default=None, help="number of images (default: len(--classes), or 16)")
    g.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1 = none)")
    g.add_argument("--guidance-channels", default="all", choices=("all", "first3"),
                   help="latent channels guided: all 4 (official LaMamba-Diff) or the first 3 (DiT)")
    g.add_argument("--steps", type=int, default=250, help="sampling steps (respaced from the 1000 training steps)")
    g.add_argument("--sampler", default="ddpm", help="ddpm (ancestral, the paper's) or ddim (eta 0)")
    g.add_argument("--seed", type=int, default=0, help="run seed; sample i uses a generator seeded by (seed, i)")
    g.add_argument("--batch-size", type=int, default=16, help="samples per forward (per rank)")
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="model precision (bf16 = autocast)")
    g.add_argument("--device", default="auto", help="'auto' (cuda:LOCAL_RANK if available, else cpu), 'cpu', 'cuda:0'...")
    v = p.add_argument_group("decoding and output")
    v.add_argument("--vae", default=None, help="diffusers AutoencoderKL folder or hub id (default: the weights' 'vae' metadata)")
    v.add_argument("--vae-scale", type=float, default=None,
                   help=f"latent scale (decode z / scale; default: 'vae_scale' metadata or {DEFAULT_VAE_SCALE})")
    v.add_argument("--out", required=True, help="output folder")
    v.add_argument("--grid", type=int, default=64, help="number of samples in grid.png")
    v.add_argument("--no-png", action="store_true", help="skip the per-sample PNGs (npz and grid only)")
    v.add_argument("--overwrite", action="store_true", help="allow an --out folder that already holds samples")
    p.set_defaults(func=run)
    return p


def validate_args(args) -> None:
    if args.sampler not in SAMPLERS:
        raise _cli_error(f"--sampler {args.sampler!r}: unknown sampler; choose from {', '.join(SAMPLERS)}")
    if not args.cfg_scale >= 1.0:
        raise _cli_error(f"--cfg-scale {args.cfg_scale}: must be >= 1 (1 = no guidance)")
    if args.steps < 1 or args.steps > 1000:
        raise _cli_error(f"--steps {args.steps}: must be in 1..1000")
    if args.num_samples is not None and args.num_samples < 1:
        raise _cli_error(f"--num-samples {args.num_samples}: must be >= 1")
    if args.batch_size < 1:
        raise _cli_error(f"--batch-size {args.batch_size}: must be >= 1")
    if args.weights is None and args.checkpoint is None:
        raise _cli_error("give --weights FILE.safetensors or --checkpoint RUN_DIR")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _cli_error(f"--out {out} is an existing file, not a folder")
    if (out / "sample_info.json").exists() and not args.overwrite:
        raise _cli_error(f"{out} already holds samples (sample_info.json); choose another --out or pass --overwrite")


def run(args) -> int:
    validate_args(args)
    import numpy as np
    import torch
    import torch.distributed as dist

    from lamamba_dist.diffusion import create_diffusion

    info = setup_distributed(args.device)
    ok = False
    try:
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        model, meta, prov = load_sampling_model(args.weights, args.checkpoint, args.ema, info.device,
                                                verify=not args.no_verify)
        num_classes = int(meta["num_classes"])
        if num_classes == 0 and args.cfg_scale > 1:
            raise _cli_error("this model is unconditional (num_classes = 0): --cfg-scale must be 1")
        vae_id = args.vae or meta.get("vae")
        if not vae_id:
            raise _cli_error("no VAE: pass --vae PATH_OR_ID (the weights carry no 'vae' metadata)")
        vae_scale = float(args.vae_scale if args.vae_scale is not None else meta.get("vae_scale", DEFAULT_VAE_SCALE))
        vae = load_vae(vae_id, info.device)

        labels = parse_classes(args.classes, num_classes, args.num_samples, args.seed)
        n = len(labels)
        diffusion = create_diffusion(timestep_respacing=args.steps, learn_sigma=bool(meta.get("learn_sigma", True)))
        out = Path(args.out)
        img_dir = out / "images"
        if info.is_main:
            img_dir.mkdir(parents=True, exist_ok=True)
        if info.world_size > 1:
            dist.barrier()
        img_dir.mkdir(parents=True, exist_ok=True)

        my_batches = rank_batches(n, args.batch_size, info.rank, info.world_size)
        n_batches = math.ceil(n / args.batch_size)
        rounds = math.ceil(n_batches / info.world_size)
        bar = None
        if info.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=rounds * diffusion.num_timesteps, unit="step",
                       desc=f"sampling {n} images on {info.world_size} rank(s)")
        all_images = None
        all_labels = np.asarray(labels, dtype=np.int64)
        t0 = time.time()
        for r in range(rounds):
            batch = my_batches[r] if r < len(my_batches) else []
            part = None
            if batch:
                z = sample_latents(model, diffusion, [labels[i] for i in batch], batch, args.seed, args.sampler,
                                   args.cfg_scale, args.guidance_channels, info.device, args.precision,
                                   on_step=(lambda: bar.update(1)) if bar is not None else None)
                imgs = decode_to_uint8(vae, z, vae_scale)
                if not args.no_png:
                    for i, im in zip(batch, imgs):
                        _save_png(im, img_dir / f"{i:06d}.png")
                part = (batch, imgs)
            elif bar is not None:
                bar.update(diffusion.num_timesteps)
            parts = [part]
            if info.world_size > 1:
                parts = [None] * info.world_size if info.is_main else None
                dist.gather_object(part, parts, dst=0)
            if info.is_main:
                for pr in parts:
                    if pr is None:
                        continue
                    idx, imgs = pr
                    if all_images is None:
                        all_images = np.zeros((n, *imgs.shape[1:]), dtype=np.uint8)
                    all_images[idx] = imgs
                bar.set_postfix(images=min(n, (r + 1) * info.world_size * args.batch_size))
        elapsed = time.time() - t0
        if bar is not None:
            bar.close()

        if info.is_main:
            tmp = out / "samples.npz.tmp"
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=all_images, arr_1=all_labels)
            tmp.replace(out / "samples.npz")
            _save_png(make_grid(all_images[: max(1, args.grid)]), out / "grid.png")
            sample_info = dict(
                prov,
                sampler=args.sampler,
                steps=args.steps,
                cfg_scale=args.cfg_scale,
                guidance_channels=args.guidance_channels,
                clip_denoised=False,
                seed=args.seed,
                seeding="sample i: initial and step noise from torch.Generator seeded by "
                        "lamamba_dist.diffusion.sample_seed(seed, i); fixed global batches of batch_size",
                classes=args.classes,
                labels=all_labels.tolist(),
                num_samples=n,
                batch_size=args.batch_size,
                world_size=info.world_size,
                precision=args.precision,
                device=str(info.device.type),
                vae=str(vae_id),
                vae_scale=vae_scale,
                image_shape=list(all_images.shape[1:]),
                npz="samples.npz",
                seconds=round(elapsed, 3),
                images_per_s=round(n / elapsed, 4) if elapsed > 0 else None,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            )
            from lamamba_dist import __version__

            sample_info["lamamba_dist_version"] = __version__
            tmpj = out / "sample_info.json.tmp"
            tmpj.write_text(json.dumps(sample_info, indent=2) + "\n")
            tmpj.replace(out / "sample_info.json")
            print(f"wrote {n} samples to {out} ({elapsed:.1f} s, {n / max(elapsed, 1e-9):.3f} img/s)")
        ok = True
    except OSError as e:  # disk full, read-only folder: one line, no traceback
        import errno

        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                           errno.EISDIR, errno.EEXIST):
            raise
        for leftover in Path(args.out).glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        raise _cli_error(f"cannot write under {args.out}: {e.strerror or e}"
                         + (f" ({e.filename})" if getattr(e, "filename", None) else "")) from None
    finally:
        teardown_distributed(info, ok)
    return 0
