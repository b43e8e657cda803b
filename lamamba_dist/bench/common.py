"""What every bench of this package writes: one JSON object

    {"bench": "model" | "train" | "sample" | "loader" | "vae" | "kernels", "environment": {...}, ...,
     "results": [one row per measurement]}

with the same environment block (:func:`environment`: versions, host, device, and the bench's own extras such as
the world size or the command line), written atomically (:func:`write_json`)."""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional


def environment(device, **extra: Any) -> dict:
    """The environment block: torch, python, host, UTC time, DeepSpeed's version (read from its metadata, not
    imported), the device (type; on GPUs its name, CUDA, cuDNN, NCCL and the visible GPUs; on CPUs the processor),
    whether the fused selective scan is available, then ``extra``."""
    import torch

    device = torch.device(device)
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "hostname": platform.node(),
                           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device.type}
    try:
        env["deepspeed"] = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        pass
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), gpus_visible=torch.cuda.device_count())
        try:
            env["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001 - a build without NCCL
            pass
    else:
        env["cpu"] = platform.processor() or platform.machine()
    from lamamba_dist.ops import fused_available

    env["fused_scan"] = bool(fused_available())
    env.update(extra)
    return env


def write_json(path, obj: dict, indent: int = 2) -> str:
    """``obj`` as JSON text, written to ``path`` (its folder created) through a temporary file and a rename, so a
    reader never sees half a file; returns the text. ``path`` None: only the text."""
    text = json.dumps(obj, indent=indent, default=str)
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)
    return text


def write_markdown(out: str, text: str) -> None:
    """The markdown benches' output (`bench scaling`, `bench table`): ``text`` to stdout for ``out`` "-", else to the
    file ``out`` (its folder created), saying so."""
    if out == "-":
        sys.stdout.write(text)
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    print(f"wrote {out}")


def short_error(e: BaseException) -> str:
    """An exception as one line of at most about 600 characters (a bench row's ``"error"``)."""
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= 600 else msg[:600] + " ..."


def error_kind(msg: Optional[str]) -> str:
    """``"oom"`` for an out-of-memory error message, else ``"error"`` (a bench row's ``"error_kind"``)."""
    return "oom" if msg and ("OutOfMemoryError" in msg or "out of memory" in msg.lower()) else "error"
