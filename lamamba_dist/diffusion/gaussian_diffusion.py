"""Gaussian diffusion: the DiT/IDDPM objective and its DDPM/DDIM samplers (docs/model.md §8).

The network never sees noise schedules: it maps (x_t, t, y) to (eps, v). This module turns
that prediction into a training loss (``training_losses``) and into samples
(``p_sample_loop`` / ``ddim_sample_loop``). The schedule is computed in float64 with numpy,
exactly like IDDPM, and coefficients are gathered per timestep and cast to float32 at use.

Conventions (as in DiT):
- ``model_mean_type`` is always epsilon prediction.
- ``var_type`` "learned_range": the model's second half of channels, v in [-1, 1], interpolates
  log sigma^2 between log beta_t and log beta~_t (the clipped posterior variance);
  "fixed_large" / "fixed_small" when the model does not learn sigma.
- ``loss_type`` "mse" (raw, not rescaled), so loss = MSE(eps) + VLB(stop-grad eps).

Randomness in the samplers: ``generator`` may be one ``torch.Generator`` or a list with one
generator per sample (row of the batch). With a list, every random number a sample uses comes
from its own generator, so a sample's trajectory does not depend on which other samples share
its batch or on how many ranks are sampling. Noise is drawn on the generator's device (CPU
generators by default) and moved to the tensor's device, so a seed means the same noise on any
device.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from lamamba_dist.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl

VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")
LOSS_TYPES = ("mse", "rescaled_mse")

GeneratorLike = Union[None, torch.Generator, Sequence[torch.Generator]]


# --------------------------------------------------------------------------- schedules


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1], into betas (IDDPM's cosine schedule helper)."""
    betas = []
    for i in range(num_timesteps):
        t1 = i / num_timesteps
        t2 = (i + 1) / num_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """float64 betas. "linear": 1e-4..0.02 scaled by 1000/T (DDPM; scale 1 at T = 1000). "cosine": IDDPM."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {name!r}; choose 'linear' or 'cosine'")


# --------------------------------------------------------------------------- helpers


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=list(range(1, x.ndim)))


# The schedule arrays as tensors, once per (array, device): a copy from pageable host memory on every call
# would also wait for the GPU (a hidden host sync per call in the training step).
# An entry lives as long as its array (weakref.finalize drops it), so ids are never reused while cached.
_DEVICE_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _table(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    key = (id(arr), device)
    hit = _DEVICE_TABLES.get(key)
    if hit is None:
        hit = _DEVICE_TABLES[key] = torch.from_numpy(arr).to(device=device)
        weakref.finalize(arr, _DEVICE_TABLES.pop, key, None)
    return hit


def _extract(arr: np.ndarray, t: torch.Tensor, broadcast_shape: Sequence[int]) -> torch.Tensor:
    """arr[t] as float32 on t's device, shaped (B, 1, ..., 1) and broadcast to ``broadcast_shape``."""
    res = _table(arr, t.device)[t].float()
    while res.ndim < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


def randn_like_per_sample(x: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; with a list of generators, row i comes from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        gdev = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {x.shape[0]}")
    rows = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in gens]
    return torch.stack(rows).to(x.device)


# --------------------------------------------------------------------------- diffusion


class GaussianDiffusion:
    """Forward process q, model-parameterised reverse process p, the loss and the samplers.

    Args:
        betas: float64 array of length T.
        var_type: one of ``VAR_TYPES``.
        loss_type: "mse" (DiT) or "rescaled_mse" (VLB scaled by T/1000).
    """

    def __init__(self, *, betas: np.ndarray, var_type: str = "learned_range", loss_type: str = "mse"):
        if var_type not in VAR_TYPES:
            raise ValueError(f"var_type {var_type!r}: choose from {VAR_TYPES}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r}: choose from {LOSS_TYPES}")
        self.var_type = var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        assert betas.ndim == 1, "betas must be 1-D"
        assert (betas > 0).all() and (betas <= 1).all(), "betas must be in (0, 1]"
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0, so the log is clipped to beta~_1 at t = 0 (IDDPM). A 1-step process has no beta~_1:
        # use beta_0 (only the t = 0 step exists, which adds no noise).
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1
            else np.log(betas)
        )
        self.log_betas = np.log(betas)
        # fixed_large: beta_t, with beta~_1 at t = 0 for a better decoder log-likelihood (IDDPM).
        self.fixed_large_variance = (np.append(self.posterior_variance[1], betas[1:]) if self.num_timesteps > 1
                                     else betas)
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ------------------------------------------------------------------ model call (overridden by SpacedDiffusion)

    def _call_model(self, model: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        return model(x, t, **model_kwargs)

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract(self.posterior_variance, t, x_t.shape)
        log_variance_clipped = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance_clipped

    def sample_t(self, batch: int, device: Union[str, torch.device], generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training timesteps, uniform over {0, ..., T-1}, as a long tensor on ``device``."""
        gdev = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gdev).to(device)

    # ------------------------------------------------------------------ reverse process

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    def p_mean_variance(
        self,
        model: Callable,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: Optional[dict] = None,
    ) -> dict:
        """Apply the model to get p(x_{t-1} | x_t) and the x_0 prediction.

        Returns dict(mean, variance, log_variance, pred_xstart, eps).
        """
        model_kwargs = model_kwargs or {}
        B, C = x.shape[:2]
        assert t.shape == (B,)
        model_output = self._call_model(model, x, t, model_kwargs)

        if self.var_type == "learned_range":
            assert model_output.shape == (B, C * 2, *x.shape[2:]), (
                f"learned-sigma diffusion needs {2 * C} output channels, model gave {tuple(model_output.shape)}"
            )
            eps, var_values = torch.split(model_output, C, dim=1)
            min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(self.log_betas, t, x.shape)
            frac = (var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            eps = model_output[:, :C] if model_output.shape[1] != C else model_output
            if self.var_type == "fixed_large":
                # beta_t, with beta~_1 at t = 0 for a better decoder log-likelihood (IDDPM).
                variance, log_variance = self.fixed_large_variance, self.fixed_large_log_variance
            else:
                variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = _extract(variance, t, x.shape)
            model_log_variance = _extract(log_variance, t, x.shape)

        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    # ------------------------------------------------------------------ loss

    def _vb_terms_bpd(
        self,
        model: Callable,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: Optional[dict] = None,
    ) -> dict:
        """One VLB term in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Callable,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[dict] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> dict:
        """Per-sample losses for one batch: dict(loss, mse, vb), each of shape (B,).

        loss = mse + vb when sigma is learned (vb uses a stop-gradient eps, so it only trains the
        variance channels), loss = mse otherwise (vb then is zeros).
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._call_model(model, x_t, t, model_kwargs)
        B, C = x_t.shape[:2]
        terms: dict[str, torch.Tensor] = {}
        if self.var_type == "learned_range":
            assert model_output.shape == (B, C * 2, *x_t.shape[2:]), (
                f"learned-sigma diffusion needs {2 * C} output channels, model gave {tuple(model_output.shape)}"
            )
            eps, var_values = torch.split(model_output, C, dim=1)
            frozen_out = torch.cat([eps.detach(), var_values], dim=1)
            vb = self._vb_terms_bpd(
                model=_Frozen(frozen_out), x_start=x_start, x_t=x_t, t=t, clip_denoised=False
            )["output"]
            if self.loss_type == "rescaled_mse":
                vb = vb * self.num_timesteps / 1000.0
        else:
            eps = model_output[:, :C]
            vb = torch.zeros(B, device=x_t.device, dtype=model_output.dtype)
        assert eps.shape == noise.shape
        mse = mean_flat((noise - eps) ** 2)
        terms["mse"] = mse
        terms["vb"] = vb
        terms["loss"] = mse + vb
        return terms

    # ------------------------------------------------------------------ DDPM sampling

    def p_sample(
        self,
        model: Callable,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: Optional[dict] = None,
        generator: GeneratorLike = None,
    ) -> dict:
        """One ancestral step x_t -> x_{t-1} (no noise at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        noise = randn_like_per_sample(x, generator)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _initial_noise(self, shape, noise, device, generator) -> torch.Tensor:
        if noise is not None:
            return noise.to(device)
        return randn_like_per_sample(torch.empty(shape, device=device), generator)

    def p_sample_loop_progressive(
        self,
        model: Callable,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = False,
        model_kwargs: Optional[dict] = None,
        device: Union[None, str, torch.device] = None,
        progress: bool = False,
        generator: GeneratorLike = None,
    ) -> Iterator[dict]:
        device = device or "cpu"
        img = self._initial_noise(shape, noise, device, generator)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="ddpm", leave=False)
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(model, img, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs, generator=generator)
            yield out
            img = out["sample"]

    def p_sample_loop(self, model: Callable, shape: Sequence[int], **kwargs: Any) -> torch.Tensor:
        """DDPM ancestral sampling over all (possibly respaced) steps; returns x_0."""
        final = None
        for final in self.p_sample_loop_progressive(model, shape, **kwargs):
            pass
        return final["sample"]

    # ------------------------------------------------------------------ DDIM sampling

    def ddim_sample(
        self,
        model: Callable,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
        generator: GeneratorLike = None,
    ) -> dict:
        """One DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        # Re-derive eps from the (possibly clipped) x_0 prediction, as IDDPM does.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        if eta > 0:
            noise = randn_like_per_sample(x, generator)
            sample = mean_pred + nonzero_mask * sigma * noise
        else:
            sample = mean_pred
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop_progressive(
        self,
        model: Callable,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = False,
        model_kwargs: Optional[dict] = None,
        device: Union[None, str, torch.device] = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: GeneratorLike = None,
    ) -> Iterator[dict]:
        device = device or "cpu"
        img = self._initial_noise(shape, noise, device, generator)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="ddim", leave=False)
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.ddim_sample(
                    model, img, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs, eta=eta, generator=generator
                )
            yield out
            img = out["sample"]

    def ddim_sample_loop(self, model: Callable, shape: Sequence[int], **kwargs: Any) -> torch.Tensor:
        """DDIM sampling over all (possibly respaced) steps; returns x_0."""
        final = None
        for final in self.ddim_sample_loop_progressive(model, shape, **kwargs):
            pass
        return final["sample"]

    def sample_loop(self, sampler: str, model: Callable, shape: Sequence[int], **kwargs: Any) -> torch.Tensor:
        """Dispatch by name: "ddpm" or "ddim"."""
        if sampler == "ddpm":
            return self.p_sample_loop(model, shape, **kwargs)
        if sampler == "ddim":
            return self.ddim_sample_loop(model, shape, **kwargs)
        raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'")


class _Frozen:
    """A "model" returning a fixed output: lets the VLB reuse p_mean_variance on a stop-grad eps."""

    def __init__(self, output: torch.Tensor):
        self.output = output

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.output
