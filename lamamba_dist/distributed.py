"""Joining the process group, shared by training (DeepSpeed's group, lamamba_dist/train/) and sampling
(lamamba_dist/sample.py). The launcher (torchrun, the deepspeed launcher, submitit) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain single-process call runs as a group of one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


def ensure_dist_env() -> None:
    """Make a plain single-process call look like a 1-rank launch (its rendezvous: init_device_and_process_group)."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))


def init_device_and_process_group() -> tuple[bool, torch.device]:
    """This rank's device (cuda:LOCAL_RANK with TF32 matmuls, or the CPU) and the DeepSpeed process group
    (NCCL on GPUs, gloo on CPU), initialised once per process. Returns (on_cuda, device).

    A single process started without a launcher (no ``MASTER_PORT``) gets a 1-rank group on a store whose port
    the OS picks when it binds, so that concurrent single-process runs never race for one port."""
    import deepspeed
    import torch.distributed as dist

    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if os.environ.get("WORLD_SIZE") == "1" and "MASTER_PORT" not in os.environ:
            from deepspeed.accelerator import get_accelerator

            # (its port is not exported: a process started from this one would inherit it and find it taken)
            store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), 0, 1, is_master=True)
            dist.init_process_group(get_accelerator().communication_backend_name(), store=store, rank=0,
                                    world_size=1)
        deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, verbose=False)
    return on_cuda, device


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Collective: rank ``src``'s ``obj`` on every rank (the object itself in a group of one)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------- sampling's group (no DeepSpeed)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = "cpu"
    we_initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if the environment asks for one (gloo on CPU, nccl on CUDA)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        info.we_initialized = True
    return info


def teardown_distributed(info: DistInfo, ok: bool = True) -> None:
    """Leave the process group we joined (a barrier only on success: a failed rank must not hang the others)."""
    import torch.distributed as dist

    if info.we_initialized and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
