"""Inference weights: one safetensors file, with the model's identity in its metadata.

Training checkpoints (DeepSpeed folders) hold everything needed to continue a run;
these files hold only what sampling needs: the (EMA or raw) weights plus
``model`` (registry name), ``resolution``, ``num_classes``, ``learn_sigma`` and any
extra string metadata (e.g. the VAE the latents were made with, the step).
Keys never carry wrapper prefixes (``module.``, ``_orig_mod.``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP/DeepSpeed/compile prefixes, however deeply nested."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k = k[len(p):]
                    changed = True
        out[k] = v
    return out


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``state_dict`` (prefixes stripped, contiguous CPU tensors) and ``meta`` atomically."""
    from safetensors.torch import save_file

    for key in ("model", "resolution", "num_classes"):
        if key not in meta:
            raise ValueError(f"save_weights: metadata key {key!r} is required")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in strip_wrapper_prefixes(state_dict).items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            save_file(sd, str(tmp), metadata={"lamamba": json.dumps(meta, sort_keys=True)})
        except Exception as e:  # safetensors reports I/O failures as its own error type: make them OSErrors
            m = re.search(r"os error (\d+)", str(e))
            if not m:
                raise
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), str(tmp)) from None
        tmp.replace(path)
    except BaseException:  # disk full, interrupted: no half-written *.tmp left behind, the old file untouched
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_weights`; clear errors for missing or damaged files."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("lamamba")
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises several types for truncated files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if raw is None:
        raise ValueError(f"{path}: safetensors file has no 'lamamba' metadata (not written by lamamba export)")
    return sd, json.loads(raw)
