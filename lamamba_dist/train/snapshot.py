"""The host side of a background save (checkpointing.py): this rank's state copied to host memory whose buffers
are reused from one save to the next, DeepSpeed's checkpoint engine turned into one that snapshots, and the
file writes that hash what they write."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

from lamamba_dist.hashing import HashingWriter


class HostBuffers:
    """Host copies of a state, their memory reused from one save to the next (at most one save is in flight).

    On GPUs the copies go to pinned memory, carved in order out of one pinned arena that :meth:`reserve` allocates
    in a background thread ahead of the first save (pinning ~10 GiB takes seconds: not while training waits).
    Whatever does not fit (or comes before the arena is ready) gets a buffer of its own, kept for the next save."""

    ALIGN = 64

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self._pool: list[torch.Tensor] = []
        self._next = 0
        self.nbytes = 0
        self._arena: Optional[torch.Tensor] = None
        self._arena_np = None  # the arena as a buffer: each copy is a tensor of its own storage inside it
        self._arena_ready = threading.Event()
        self._reserving = False
        self._offset = 0

    def reserve(self, nbytes: int) -> None:
        """Allocate (in the background) a pinned arena of ``nbytes`` for the coming saves."""
        if not self.pinned or nbytes <= 0:
            return
        self._arena_ready.clear()
        self._reserving = True

        def alloc():
            try:
                self.set_arena(torch.empty(int(nbytes), dtype=torch.uint8, pin_memory=True))
            except Exception:  # noqa: BLE001 - not enough pinnable memory (or none): per-tensor buffers instead
                self._arena = self._arena_np = None
            finally:
                self._reserving = False
                self._arena_ready.set()

        threading.Thread(target=alloc, name="lamamba-pinned-arena", daemon=True).start()

    def wait_reserved(self, timeout: Optional[float] = None) -> float:
        """Wait until the arena of :meth:`reserve` is allocated (at most ``timeout`` s); returns the seconds waited.

        Pinning the arena holds the host for seconds (page locking; the driver serialises other CUDA calls
        meanwhile), so the steps taken while it runs are slower: a measurement of steady training waits first."""
        if not self._reserving:
            return 0.0
        t0 = time.perf_counter()
        self._arena_ready.wait(timeout)
        return time.perf_counter() - t0

    def set_arena(self, arena: torch.Tensor) -> None:
        """Carve the copies out of ``arena`` (uint8, on the host) from the next :meth:`start` on."""
        self._arena, self._arena_np = arena, arena.numpy()
        self._arena_ready.set()

    def start(self) -> None:
        self._next = 0
        self._offset = 0
        self.nbytes = 0

    def _from_arena(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        if not self._arena_ready.is_set() or self._arena_np is None:
            return None
        n = t.numel() * t.element_size()
        start = -(-self._offset // self.ALIGN) * self.ALIGN
        if n == 0 or start + n > self._arena.numel():
            return None
        self._offset = start + n
        # Not a view of the arena (``arena[a:b].view(...)``): a view shares the arena's storage, and torch.save and
        # safetensors write a tensor's whole storage (the arena, in every file). frombuffer makes a storage of
        # exactly these bytes, at this address inside the arena (still pinned memory).
        return torch.frombuffer(self._arena_np, dtype=t.dtype, count=t.numel(), offset=start).view(t.shape)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        self.nbytes += t.numel() * t.element_size()
        out = self._from_arena(t)
        if out is None:
            i = self._next
            self._next += 1
            buf = self._pool[i] if i < len(self._pool) else None
            if buf is None or buf.dtype != t.dtype or buf.numel() != t.numel():
                buf = torch.empty(t.numel(), dtype=t.dtype, pin_memory=self.pinned and t.device.type == "cuda")
                if i < len(self._pool):
                    self._pool[i] = buf
                else:
                    self._pool.append(buf)
            out = buf.view(t.shape)
        out.copy_(t, non_blocking=t.device.type == "cuda")
        return out

    def tree(self, obj: Any) -> Any:
        """``obj`` with every tensor replaced by its host copy (containers rebuilt, other objects shared)."""
        if torch.is_tensor(obj):
            return self.copy(obj)
        if isinstance(obj, torch.Size):
            return obj
        if isinstance(obj, dict):
            out = type(obj)() if type(obj) is not dict else {}
            try:
                for k, v in obj.items():
                    out[k] = self.tree(v)
            except TypeError:  # a dict subclass that cannot be built empty
                out = {k: self.tree(v) for k, v in obj.items()}
            return out
        if isinstance(obj, list):
            return [self.tree(v) for v in obj]
        if isinstance(obj, tuple):
            items = [self.tree(v) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
        return obj


class SnapshotEngine:
    """A DeepSpeed checkpoint engine (``engine.checkpoint_engine``) whose ``save`` copies the state dict to host
    memory and records where it goes, for the writer thread; loading goes to DeepSpeed's own engine.

    ``engine.checkpoint_engine`` is DeepSpeed's pluggable checkpoint-engine slot (its Nebula, FastPersist and
    DataStates engines use the same interface: ``create``, ``save``, ``load``, ``commit``, ``makedirs``)."""

    def __init__(self, inner, buffers: HostBuffers):
        self.inner = inner
        self.name = "LamambaSnapshot"
        self.buffers = buffers
        self.captured: Optional[list[tuple[str, Any]]] = None  # (path, host state) of the save being taken

    # the interface DeepSpeed calls
    def create(self, info) -> None:
        pass

    def makedirs(self, path, exist_ok=False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path: str) -> None:
        if self.captured is None:  # a save outside CheckpointManager: DeepSpeed's own engine writes it now
            self.inner.save(state_dict, path)
            return
        self.captured.append((str(path), self.buffers.tree(state_dict)))

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location=map_location)

    def commit(self, info) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info) -> None:
        pass

    def get_commit_info(self):
        return None

    def cleanup(self) -> None:
        pass

    def preserves_storage_sharing(self) -> bool:
        return False  # every tensor is copied on its own: DeepSpeed need not clone views first


def lower_thread_priority(nice: int) -> bool:
    """Raise the calling thread's nice value by ``nice`` (Linux schedules threads one by one: the process's other
    threads keep theirs). Returns whether it took effect; elsewhere, or where refused, nothing changes."""
    if nice <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:
        return False
    return True


def fsync_file(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_hashed(obj, path: Path, zipfile: bool = True) -> str:
    """``torch.save(obj)`` to ``path``; returns the sha256 of the file's bytes. A failed write raises its OSError
    with ``path`` as the file name (e.g. "No space left on device")."""
    with open(path, "wb") as f:
        w = HashingWriter(f)
        try:
            torch.save(obj, w, _use_new_zipfile_serialization=zipfile)
        except Exception:
            if w.error is not None:
                raise OSError(w.error.errno, w.error.strerror or str(w.error), str(path)) from None
            raise
    return w.sha.hexdigest()
