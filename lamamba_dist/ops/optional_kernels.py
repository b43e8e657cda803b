"""The Triton kernel modules of lamamba_dist.ops, imported where triton imports.

Each dispatch point resolves its kernel module once, at its own import, so that the result is a constant to
torch.compile; on a machine without triton (CPU CI without the dev extra) the module is None and the dispatch
point falls back to, or asks for, its PyTorch path.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def triton_module(name: str) -> ModuleType | None:
    """``lamamba_dist.ops.<name>``, or None where it does not import (triton missing)."""
    try:
        return importlib.import_module(f"lamamba_dist.ops.{name}")
    except Exception:  # triton missing, or a triton that cannot load here
        return None
