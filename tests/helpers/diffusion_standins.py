"""Small stand-in "models" for the diffusion and sampler tests (not a test module)."""

from __future__ import annotations

import torch
from torch import nn


class TinyEpsNet(nn.Module):
    """A few convs with a class and timestep embedding: (B, C, S, S) -> (B, 2C, S, S).

    Matches the create_model contract closely enough for the samplers: ``num_classes``
    (row ``num_classes`` is the null class), ``in_channels``, ``latent_size`` and a
    ``forward_with_cfg`` with the LaMamba guidance semantics.
    """

    def __init__(self, channels: int = 4, size: int = 8, num_classes: int = 10, learn_sigma: bool = True):
        super().__init__()
        self.in_channels = channels
        self.latent_size = size
        self.num_classes = num_classes
        out = channels * 2 if learn_sigma else channels
        self.emb_y = nn.Embedding(num_classes + 1, 16)
        self.emb_t = nn.Linear(1, 16)
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, out, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.emb_y(y) + self.emb_t(t.float()[:, None] / 1000.0)  # (B, 16)
        h = torch.nn.functional.silu(self.conv1(x) + c[:, :, None, None])
        out = self.conv2(h)
        # eps ~ x_t plus a learned correction, v squashed to [-1, 1]: keeps random-weight sampling finite.
        eps = x + 0.1 * out[:, : self.in_channels]
        return torch.cat([eps, torch.tanh(out[:, self.in_channels :])], dim=1)

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels="all"):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        n = 3 if guidance_channels == "first3" else self.in_channels
        eps, rest = out[:, :n], out[:, n:]
        cond, uncond = eps.chunk(2)
        g = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([g, g]), rest], dim=1)


class ExactEpsOracle(nn.Module):
    """For data that is the single point ``x0``, returns the exact noise of x_t, plus v channels.

    It reads the *original* timestep from ``t`` and the base schedule's alpha_bar, so it is only
    exact when the sampler passes original timestep values (which respacing must do).
    """

    def __init__(self, x0: torch.Tensor, alphas_cumprod, v: float = 0.0, num_classes: int = 10):
        super().__init__()
        self.register_buffer("x0", x0.double())
        self.register_buffer("abar", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.v = v
        self.num_classes = num_classes
        self.in_channels = x0.shape[1]
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t, y=None):
        self.calls.append(t.clone())
        a = self.abar[t].view(-1, *([1] * (x.ndim - 1)))
        x0 = self.x0.expand_as(x) if self.x0.shape[0] == 1 else self.x0[: x.shape[0]]
        eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1).to(x.dtype)

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels="all"):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        C = self.in_channels
        eps, rest = out[:, :C], out[:, C:]
        cond, uncond = eps.chunk(2)
        g = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([g, g]), rest], dim=1)
