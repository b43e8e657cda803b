"""What a researcher watches during a run: sample grids and an in-loop FID, from the EMA weights.

``[train] sample_every``: a fixed grid (``sample_classes`` x ``sample_per_class``, fixed noise from
``sample_seed``) sampled with DDIM and classifier-free guidance, decoded with the run's VAE (the one the latent
shards' manifest names; where it cannot be loaded, or for synthetic data, the latents' first three channels are
shown instead), written to ``RUN/samples/step_XXXXXXXX.png`` (under a temporary name, renamed when complete).

``[train] fid_every``: FID of ``fid_samples`` samples against a reference batch, with the feature network and the
Fréchet distance of ``lamamba eval`` (lamamba_dist/evaluate.py). A few thousand samples give the trend of a run,
not the paper's 50k-sample number.

Both are collective (every rank samples its share of the fixed sample indices, rank 0 assembles), run under
``torch.no_grad`` in the training precision (bf16 autocast unless the run is fp32) on a copy of the model
that holds the full EMA weights, and leave the training RNG as they found it: every random draw comes from the
per-sample generators of :func:`lamamba_dist.diffusion.sample_generators`, and the global CPU and CUDA RNG states
are restored afterwards, so a run with sampling is bitwise the run without it. The trainer keeps their time out of
its img/s.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

SAMPLES_DIR = "samples"


@contextlib.contextmanager
def training_rng_untouched():
    """Restore the global CPU and CUDA RNG states on exit."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def latents_to_uint8(z: torch.Tensor) -> np.ndarray:
    """The first three latent channels as an RGB image (N, H, W, 3) uint8: [-2.5, 2.5] -> [0, 255], 4x enlarged."""
    x = torch.clamp(z[:, :3].float() / 2.5 * 127.5 + 128.0, 0, 255)
    x = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    return x.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


class RunWatcher:
    """Sample grids and in-loop FID for one trainer (built once; the sampling model and VAE are made on first use)."""

    def __init__(self, cfg, *, engine, ema, dist, rank: int, world: int, device: torch.device, run_dir: Path,
                 vae_meta: dict, precision: str, info: Callable[[str], None], warn: Callable[[str], None]):
        self.cfg, self.t = cfg, cfg.train
        self.engine, self.ema, self.dist = engine, ema, dist
        self.rank, self.world, self.device = rank, world, device
        self.run_dir = Path(run_dir)
        self.vae_meta = vae_meta
        self.precision = "fp32" if precision == "fp32" else "bf16"
        self.info, self.warn = info, warn
        self._model = None
        self._vae: Any = None  # None: not tried yet; False: not available (latent channels shown)
        self._extractor = None
        self._ref_stats: Optional[tuple[np.ndarray, np.ndarray]] = None

    @property
    def enabled(self) -> bool:
        return bool(self.t.sample_every or self.t.fid_every)

    def due(self, step: int) -> tuple[bool, bool]:
        t = self.t
        return bool(t.sample_every and step % t.sample_every == 0), bool(t.fid_every and step % t.fid_every == 0)

    # ------------------------------------------------------------------ shared parts
    def run_due(self, step: int, images_seen: int, stats=None, wb=None) -> float:
        """Collective. The sample grid and FID due at ``step``: written, logged (status line, ``stats.jsonl``
        records, wandb on rank 0); returns the seconds they took (the trainer keeps them out of img/s)."""
        do_samples, do_fid = self.due(step)
        spent = 0.0
        main = self.rank == 0
        if do_samples:
            path, secs = self.sample_grid(step)
            spent += secs
            if main:
                self.info(f"samples at step {step}: {path} ({secs:.1f}s)")
                if stats:
                    stats.write({"event": "samples", "step": step, "images_seen": images_seen,
                                 "path": str(path), "seconds": round(secs, 3), "time": time.time()})
                if wb:
                    wb.log_image("samples", path, step, caption=f"step {step}")
        if do_fid:
            value, secs = self.fid(step)
            spent += secs
            if main:
                n = self.t.fid_samples
                self.info(f"FID at step {step}: {value:.2f} ({n} samples, {secs:.1f}s; not the paper's 50k FID)")
                if stats:
                    stats.write({"event": "fid", "step": step, "images_seen": images_seen, "fid": value,
                                 "samples": n, "seconds": round(secs, 3), "time": time.time()})
                if wb:
                    wb.log({f"fid{n // 1000}k" if n >= 1000 else f"fid{n}": value}, step)
        return spent

    def _ema_model(self):
        """Collective. A model holding the full fp32 EMA weights (rebuilt weights every call, the module once)."""
        if self._model is None:
            from lamamba_dist.train.engine import build_model

            with training_rng_untouched():
                self._model = build_model(self.cfg, self.device).eval().requires_grad_(False)
        full = self.ema.full_state_dict(dst=None, to_cpu=False)
        missing, _ = self._model.load_state_dict(full, strict=False)
        trainable = {n for n, p in self.engine.module.named_parameters() if p.requires_grad}
        if trainable & set(missing):
            raise RuntimeError(f"EMA weights missing for {sorted(trainable & set(missing))[:3]}")
        return self._model

    def _decoder(self):
        if self._vae is None:
            self._vae = False
            name = self.vae_meta.get("vae")
            if name:
                try:
                    from lamamba_dist.sample import load_vae

                    self._vae = load_vae(str(name), self.device)
                except Exception as e:  # noqa: BLE001 - the grid still shows the latents
                    self.warn(f"sample grids: cannot load the VAE {name!r} ({str(e).splitlines()[0]}); showing the "
                              "latents' first three channels instead")
        return self._vae

    def _images(self, model, diffusion, labels: list[int], indices: list[int], seed: int, cfg_scale: float,
                decode_required: bool = False) -> np.ndarray:
        from lamamba_dist.sample import decode_to_uint8, sample_latents

        z = sample_latents(model, diffusion, labels, indices, seed, sampler="ddim", cfg_scale=cfg_scale,
                           device=self.device, precision=self.precision)
        vae = self._decoder()
        if vae:
            return decode_to_uint8(vae, z, float(self.vae_meta.get("vae_scale") or 0.18215))
        if decode_required:
            raise RuntimeError("no VAE to decode the samples with")
        return latents_to_uint8(z)

    def _gather(self, obj):
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def _diffusion(self, steps: int):
        from lamamba_dist.diffusion import create_diffusion

        return create_diffusion(self.cfg.diffusion, timestep_respacing=f"ddim{steps}")

    # ------------------------------------------------------------------ sample grids
    def classes(self) -> list[int]:
        nc = int(self.cfg.model.num_classes)
        return list(self.t.sample_classes) or list(range(min(8, max(nc, 1))))

    @torch.no_grad()
    def sample_grid(self, step: int) -> tuple[Optional[Path], float]:
        """Collective. The step's grid (one row per class); returns (path on rank 0, seconds)."""
        from lamamba_dist.sample import _save_png, make_grid

        t0 = time.perf_counter()
        with training_rng_untouched():
            model = self._ema_model()
            per = self.t.sample_per_class
            labels = [c for c in self.classes() for _ in range(per)]
            mine = [i for i in range(len(labels)) if i % self.world == self.rank]
            imgs = self._images(model, self._diffusion(self.t.sample_steps), [labels[i] for i in mine], mine,
                                self.t.sample_seed, self.t.sample_cfg_scale) if mine else None
            parts = self._gather((mine, imgs))
        path = None
        if self.rank == 0:
            by_index = {i: im for idx, ims in parts if ims is not None for i, im in zip(idx, ims)}
            grid = make_grid(np.stack([by_index[i] for i in range(len(labels))]), nrow=per)
            out = self.run_dir / SAMPLES_DIR
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"step_{step:08d}.png"
            _save_png(grid, path)  # a temporary name first: a kill never leaves a half-written grid
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return path, time.perf_counter() - t0

    # ------------------------------------------------------------------ FID
    def _reference(self) -> tuple[np.ndarray, np.ndarray]:
        from lamamba_dist.evaluate import compute_features, gaussian_stats, open_batch

        if self._ref_stats is None:
            z, arr = open_batch(Path(self.t.fid_reference).expanduser(), "fid_reference")
            if "mu" in z.files and "sigma" in z.files:
                self._ref_stats = (np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64))
            else:
                self._ref_stats = gaussian_stats(compute_features(arr, self._features())["pool"])
        return self._ref_stats

    def _features(self):
        import os

        from lamamba_dist.evaluate import InceptionV3Features

        if self._extractor is None:
            self._extractor = InceptionV3Features(
                Path(self.t.fid_inception or os.environ.get("LAMAMBA_INCEPTION", "")).expanduser(), device=self.device)
        return self._extractor

    @torch.no_grad()
    def fid(self, step: int) -> tuple[Optional[float], float]:
        """Collective. FID of ``fid_samples`` EMA samples against the reference batch: (FID on rank 0, seconds)."""
        from lamamba_dist.evaluate import compute_features, frechet_distance, gaussian_stats
        from lamamba_dist.sample import parse_classes, rank_batches

        t0 = time.perf_counter()
        n = self.t.fid_samples
        with training_rng_untouched():
            model = self._ema_model()
            labels = parse_classes(None, int(self.cfg.model.num_classes), n, self.t.sample_seed + 1)
            diffusion = self._diffusion(self.t.fid_steps)
            feats = []
            for idx in rank_batches(n, max(1, self.t.micro_batch), self.rank, self.world):
                imgs = self._images(model, diffusion, [labels[i] for i in idx], idx, self.t.sample_seed + 1,
                                    self.t.fid_cfg_scale, decode_required=True)
                feats.append(compute_features(imgs, self._features())["pool"])
            mine = np.concatenate(feats) if feats else np.zeros((0, 2048), np.float32)
            parts = self._gather(mine)
        value = None
        if self.rank == 0:
            mu, sigma = gaussian_stats(np.concatenate(parts).astype(np.float64))
            value = float(frechet_distance(mu, sigma, *self._reference()))
        return value, time.perf_counter() - t0
