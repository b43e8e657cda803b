"""The trainer's random state: the per-micro-batch reseeding of the global generators, and the state that a
checkpoint carries per rank (lamamba_dist/train/trainer.py; the per-sample draws come from the loader,
lamamba_dist/data/loader.py)."""

from __future__ import annotations

import hashlib
import random

import torch


def micro_seed(seed: int, step: int, rank: int, micro: int, salt: int) -> int:
    h = hashlib.blake2b(f"lamamba/{seed}/{step}/{rank}/{micro}/{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def seed_rng(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for what a training step can draw from: the CPU generator and ``device``'s.
    torch.manual_seed also seeds every other backend (XPU, MTIA, ...) through lazy calls that format a stack
    trace each time: a tenth of a millisecond or more of host time per call."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        st["numpy"] = np.random.get_state()
    except Exception:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "numpy" in st:
        import numpy as np

        np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except Exception:  # different GPU count per node: per-step reseeding makes this harmless
            pass
