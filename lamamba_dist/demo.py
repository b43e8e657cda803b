"""``lamamba demo``: the whole system on one CPU machine, with no downloads, in under 10 minutes on 2 cores.

1. **Data**: a procedural, class-conditional image set (an ImageNet-style folder): 4 classes of coloured
   shapes on a noisy dark background, random position / size / hue jitter:
   0 red disc, 1 green square, 2 blue triangle, 3 yellow cross.
2. **VAE**: a tiny diffusers ``AutoencoderKL`` (downsampling 8, 4 latent channels: the same interface as
   SD's VAE) trained for a minute or two on those images, saved with ``save_pretrained``; its
   ``scaling_factor`` is set to 1 / std of the latents; the posterior std starts small (e^-4) so that
   reconstruction is learned from the first steps. (A randomly initialised VAE would decode noise.)
3. **Preprocessing**: the real Ray job (``lamamba_dist.data_pipeline.preprocess``) encodes the folder into latent shards.
4. **Training**: ``lamamba train`` with DeepSpeed ZeRO-2 on 2 CPU ranks (torchrun, gloo, fp32), from
   ``configs/demo.toml``, checkpointing as usual.
5. **Sampling**: ``lamamba sample --checkpoint RUN`` (EMA weights, DDIM + classifier-free guidance) decodes a
   grid: one row per class, so a person can check the classes were learned.

Every stage is skipped when its output is already there (rerun = resume): the dataset, the VAE and the
shards are reused, training resumes from its newest checkpoint, sampling reruns.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The demo's experiment config, carried in the package so that the demo needs no repository checkout;
# configs/demo.toml is the same text (a test keeps them equal).
DEMO_TOML = """\
# `lamamba demo`: LaMamba-Diff (debug size) on procedural coloured shapes, 32 px, 4 classes, 2 CPU ranks.
# The demo sets [data] shards and [checkpoint] dir to its own folders (see lamamba_dist/demo.py).
[model]
name = "LaMamba-debug"
resolution = 32
num_classes = 4
class_dropout = 0.1

[diffusion]
num_timesteps = 1000

[data]
shards = "runs/demo/latents"
num_workers = 0

[optim]
lr = 2e-3          # tiny model, few steps: far above the paper's 1e-4
ema_decay = 0.99   # EMA over the last ~100 steps (0.9999 suits 400k-step runs)

[train]
global_batch = 32
micro_batch = 16
steps = 1000
precision = "fp32"
zero_stage = 2
log_every = 50
sample_every = 250     # a grid of every class (rows) in runs/demo/run/samples/, from the EMA weights
sample_steps = 25
sample_cfg_scale = 2.0

[checkpoint]
dir = "runs/demo/run"
every = 100
keep = 2

[logging]
wandb = false
"""
CLASSES = ("red_disc", "green_square", "blue_triangle", "yellow_cross")
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 90, 230), (235, 215, 40))


# --------------------------------------------------------------------------- 1. procedural images


def draw_shape(cls: int, res: int, rng) -> "np.ndarray":  # noqa: F821 - numpy imported lazily
    """One uint8 (res, res, 3) image of class ``cls``."""
    import numpy as np

    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    bg = rng.uniform(10, 60)
    img = np.clip(bg + rng.normal(0, 6, (res, res, 3)), 0, 255).astype(np.float32)
    size = rng.uniform(0.22, 0.36) * res  # half extent
    cx, cy = rng.uniform(size, res - size, 2)
    dx, dy = xx - cx, yy - cy
    if cls == 0:  # disc
        mask = dx * dx + dy * dy <= size * size
    elif cls == 1:  # axis-aligned square
        mask = (np.abs(dx) <= size * 0.85) & (np.abs(dy) <= size * 0.85)
    elif cls == 2:  # upward triangle
        mask = (dy <= size * 0.8) & (dy >= -size) & (np.abs(dx) <= (dy + size) * 0.6)
    else:  # plus / cross
        w = size * 0.35
        mask = ((np.abs(dx) <= w) & (np.abs(dy) <= size)) | ((np.abs(dy) <= w) & (np.abs(dx) <= size))
    colour = np.clip(np.array(COLOURS[cls], np.float32) + rng.normal(0, 12, 3), 0, 255)
    img[mask] = colour
    return img.astype(np.uint8)


def make_dataset(folder: Path, per_class: int, res: int, seed: int = 0) -> int:
    """ImageNet-style ``folder/train/<class>/<i>.png``; returns the image count. Idempotent."""
    import numpy as np
    from PIL import Image

    split = folder / "train"
    done = folder / "DONE"
    if done.is_file():
        return sum(1 for _ in split.rglob("*.png"))
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        d = split / f"{c}_{name}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(draw_shape(c, res, rng)).save(d / f"{i:05d}.png")
    done.write_text("ok\n")
    return per_class * len(CLASSES)


def load_images(folder: Path) -> "torch.Tensor":  # noqa: F821
    import numpy as np
    import torch
    from PIL import Image

    files = sorted((folder / "train").rglob("*.png"))
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (N, 3, H, W) in [-1, 1]


# --------------------------------------------------------------------------- 2. a tiny VAE


def tiny_vae_config(res: int) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 64), act_fn="silu", sample_size=res, scaling_factor=1.0,
    )


def train_vae(images_dir: Path, out: Path, res: int, steps: int, seed: int = 0, log=print) -> float:
    """Train a tiny AutoencoderKL for ``steps`` steps (L1 + MSE reconstruction, small KL); returns its scaling factor."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    if (out / "config.json").is_file() and (out / "DONE").is_file():
        return float(json.loads((out / "config.json").read_text())["scaling_factor"])
    from tqdm import tqdm

    torch.manual_seed(seed)
    # One thread: on a small shared machine more threads than free cores makes each step ~20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x_all = load_images(images_dir)
    vae = AutoencoderKL(**tiny_vae_config(res))
    with torch.no_grad():  # start with a small posterior std (e^-4): early on, unit noise would drown the signal
        vae.quant_conv.bias[4:].fill_(-8.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=5e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    step, bar = 0, tqdm(total=steps, desc="vae", unit="step", file=sys.stderr, mininterval=2.0)
    while step < steps:
        idx = torch.randint(0, x_all.shape[0], (16,), generator=g)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(x_all[i:i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
        scale = float(1.0 / lat.std())
        rec = vae.decode(vae.encode(x_all[:256]).latent_dist.mean).sample
        err = (rec - x_all[:256]).abs().mean().item()
    torch.set_num_threads(threads)
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(out)
    (out / "DONE").write_text("ok\n")
    log(f"VAE: {step} steps, reconstruction L1 {err:.3f} (images in [-1, 1]), scaling factor {scale:.4f} -> {out}")
    return scale


# --------------------------------------------------------------------------- the pipeline


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("WANDB_MODE", "offline")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_demo(out: Path, *, per_class: int, vae_steps: int, steps: int | None, nproc: int, sample_steps: int,
             cfg_scale: float, log=print) -> Path:
    from lamamba_dist.errors import CLIError
    from lamamba_dist.config import load_config

    out = Path(out).resolve()  # every path handed to a subprocess is absolute: the user's cwd decides, nothing else
    out.mkdir(parents=True, exist_ok=True)
    demo_config = out / "demo.toml"
    if not demo_config.is_file() or demo_config.read_text() != DEMO_TOML:
        demo_config.write_text(DEMO_TOML)
    cfg = load_config(demo_config)
    res = cfg.model.resolution
    t0 = time.monotonic()
    timings = {}

    n = make_dataset(out / "images", per_class, res)
    timings["dataset"] = time.monotonic() - t0
    log(f"[1/5] {n} procedural images ({len(CLASSES)} classes: {', '.join(CLASSES)}) in {out / 'images'}")

    t = time.monotonic()
    scale = train_vae(out / "images", out / "vae", res, vae_steps, log=log)
    timings["vae"] = time.monotonic() - t
    log(f"[2/5] tiny AutoencoderKL in {out / 'vae'} (scaling factor {scale:.4f})")

    t = time.monotonic()
    from lamamba_dist.data_pipeline.preprocess import Settings, run_preprocess

    st = Settings(src=str(out / "images"), out=str(out / "latents"), resolution=res, vae=str(out / "vae"),
                  shard_size=max(64, n // 4), num_cpus=2, num_actors=1, object_store_memory=200 << 20,
                  encode_batch=32)
    import ray

    # A private local cluster: a bare ray.init() would attach to any Ray cluster already running on the machine.
    ray.init(address="local", num_cpus=2, object_store_memory=200 << 20, include_dashboard=False,
             log_to_driver=False)
    try:
        run_preprocess(st)
    finally:
        ray.shutdown()
    timings["preprocess"] = time.monotonic() - t
    log(f"[3/5] Ray preprocessing -> {out / 'latents'}")

    t = time.monotonic()
    run_dir = out / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lamamba_dist.cli", "train", "--config", str(demo_config),
           "--set", f'data.shards="{out / "latents"}"', "--set", f'checkpoint.dir="{run_dir}"']
    if steps:
        cmd += ["--set", f"train.steps={steps}"]
    log(f"[4/5] training on {nproc} CPU ranks: {' '.join(cmd[2:])}")
    rc = subprocess.run(cmd, cwd=out, env=_env()).returncode
    if rc != 0:
        raise CLIError(f"training failed (exit {rc}); rerun `lamamba demo` to resume it")
    timings["train"] = time.monotonic() - t

    t = time.monotonic()
    per = 4
    classes = ",".join(str(c) for c in range(len(CLASSES)) for _ in range(per))
    samples = out / "samples"
    cmd = [sys.executable, "-m", "lamamba_dist.cli", "sample", "--checkpoint", str(run_dir), "--vae", str(out / "vae"),
           "--vae-scale", repr(scale), "--classes", classes, "--num-samples", str(per * len(CLASSES)),
           "--steps", str(sample_steps), "--sampler", "ddim", "--cfg-scale", str(cfg_scale), "--device", "cpu",
           "--out", str(samples), "--grid", str(per * len(CLASSES)), "--overwrite", "--batch-size", "16"]
    log(f"[5/5] sampling: {' '.join(cmd[2:])}")
    rc = subprocess.run(cmd, cwd=out, env=_env()).returncode
    if rc != 0:
        raise CLIError(f"sampling failed (exit {rc})")
    timings["sample"] = time.monotonic() - t
    grid = samples / "grid.png"
    big = out / "demo_grid.png"
    _labelled_grid(grid, big, per)
    # The run's report (lamamba_dist/report.py), with the final grid among the run's samples
    from lamamba_dist.report import write_report
    from lamamba_dist.train import checkpoint as ckpt

    final = ckpt.find_latest(run_dir, hashes=False)
    (run_dir / "samples").mkdir(exist_ok=True)
    shutil.copyfile(big, run_dir / "samples" / f"{final.name if final else 'step'}_final.png")
    report = write_report(run_dir)
    timings["total"] = time.monotonic() - t0
    (out / "demo_timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=1))
    log(f"done in {timings['total'] / 60:.1f} min: {big} (rows: {', '.join(CLASSES)}); sampler grid {grid}; "
        f"the run's report: {report}")
    return big


def _labelled_grid(src: Path, dst: Path, per_row: int) -> None:
    """4x nearest-neighbour upscale of the sampler's grid with the class name left of each row."""
    from PIL import Image, ImageDraw

    im = Image.open(src).convert("RGB")
    k = 4
    im = im.resize((im.width * k, im.height * k), Image.NEAREST)
    label_w = 130
    canvas = Image.new("RGB", (im.width + label_w, im.height), (255, 255, 255))
    canvas.paste(im, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    rows = len(CLASSES)
    for r, name in enumerate(CLASSES):
        y = int((r + 0.5) * im.height / rows) - 6
        draw.text((6, y), f"{r}: {name}", fill=COLOURS[r] if r != 3 else (160, 140, 0))
    canvas.save(dst)


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(
        name, help=help_text,
        description="End-to-end demo on CPU, no downloads: procedural coloured-shape classes -> a tiny VAE trained "
                    "here -> Ray preprocessing -> DeepSpeed ZeRO-2 training on 2 CPU ranks -> checkpoint -> a sample "
                    "grid with one row per class. Rerun to resume. About 8-10 minutes on 2 cores.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--per-class", type=int, default=300, help="procedural images per class (default 300)")
    p.add_argument("--vae-steps", type=int, default=700, help="VAE training steps, batch 16 (default 700, ~2 min)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: [train] steps of configs/demo.toml, "
                                                             "1000)")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks (default 2)")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from lamamba_dist.errors import CLIError

    if args.per_class < 16 or args.nproc < 1 or args.sample_steps < 1:
        raise CLIError("--per-class must be >= 16, --nproc and --sample-steps >= 1")

    def log(msg):
        print(f"[lamamba demo] {msg}", file=sys.stderr, flush=True)

    run_demo(Path(args.out), per_class=args.per_class, vae_steps=args.vae_steps, steps=args.steps,
             nproc=args.nproc, sample_steps=args.sample_steps, cfg_scale=args.cfg_scale, log=log)
    return 0
