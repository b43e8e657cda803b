"""Parity with the official model (docs/model.md §10): deterministic weights on official key names, and the
outputs the official code computed from them."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from lamamba_dist.models import create_model
from lamamba_dist.ops import relative_position_index, shift_attention_mask

MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix_uniform(seed: int, n: int) -> np.ndarray:
    """b = 2u - 1 for i = 1..n of a splitmix64 stream, float64."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(seed) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(2 ** 53)
    return 2.0 * u - 1.0


def deterministic_value(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 1
    b = splitmix_uniform(zlib.crc32(key.encode("utf-8")), n)
    if len(shape) == 1:
        v = 1.0 + 0.1 * b if key.endswith("weight") else 0.1 * b
    else:
        v = b / np.sqrt(shape[-1])
    return torch.from_numpy(v.reshape(shape).astype(np.float32))


TINY = {
    "A": dict(overrides={}),
    "B": dict(overrides=dict(depths=(2, 2, 2, 2), mid_depth=2)),
}


def official_state_dict(which: str) -> dict[str, torch.Tensor]:
    """An official-keyed state dict (parameters + the official buffers) for Tiny-A or Tiny-B."""
    model = create_model("LaMamba-debug", resolution=128, num_classes=10, **TINY[which]["overrides"])
    sd = {}
    for name, p in model.named_parameters():
        sd[name] = deterministic_value(name, tuple(p.shape))
    for name, mod in model.named_modules():  # the buffers the official code stores
        if type(mod).__name__ == "WindowAttention":
            sd[f"{name}.relative_position_index"] = relative_position_index(mod.window_size).clone()
            if mod.shift:
                sd[name.rsplit(".", 1)[0] + ".attn_mask"] = shift_attention_mask(
                    mod.resolution, mod.window_size, mod.shift, "cpu").clone()
    return sd


# Recorded outputs of the official model (docs/model.md §10), fp32 CPU.
EXPECTED = {
    "A": dict(sum=37.972701, mean=0.00927068, abs_mean=0.36577448, eps_sum=85.288047, v_sum=-47.315346,
              e0000=0.4567232, e17_15_15=-0.7956212, e0359=0.2766103, cfg_sum=71.986422, cfg_eps_sum=123.268190,
              params=3_997_346),
    "B": dict(sum=47.623746, mean=0.01162689, abs_mean=0.36506110, eps_sum=90.115431, v_sum=-42.491685,
              e0000=0.4443470, e17_15_15=-0.8052825, e0359=0.2863730, cfg_sum=78.884425, cfg_eps_sum=126.034014,
              params=6_708_052),
}
