"""The four continuous ("snake") scan paths of LaMamba-Diff and their merge (docs/model.md §4).

For an N x N map and step s in [0, N^2): q = s // N, m = s % N, sn = m if q is even else N-1-m.

    k=0  row snake from top-left, moving down        (row, col) = (q,       sn)
    k=1  row snake from bottom-left, moving up       (row, col) = (N-1-q,   sn)
    k=2  column snake from bottom-left, moving right (row, col) = (N-1-sn,  q)
    k=3  column snake from bottom-right, moving left (row, col) = (N-1-sn,  N-1-q)

``cross_scan`` lays a (B, D, H, W) map out as four sequences (B, 4, D, L); ``cross_merge`` maps four
sequences back to the grid and sums them (no averaging). The fast versions use one gather each with
index tables built once per (N, device) and cached; ``*_reference`` follow the formula literally and are
used by the parity tests.

``snake_gather_cl`` / ``snake_merge_cl`` are the same two maps between the channels-last map (B, L, D) and the four
sequences, with the layout change folded in. Backends (``SNAKE_BACKENDS``, the model setting ``snake_backend``):
"torch" (torch's gathers plus a transpose), "triton" (the kernels of cross_scan_triton.py: contiguous reads and
writes on both sides; CUDA, or CPU under TRITON_INTERPRET=1), "fused" ("triton" here; in SS2D's scan core,
ss2d_core.py, the gather, the scan and the merge of short sequences run as one kernel, snake_scan_triton.py) and
"auto": "triton" for CUDA tensors where triton imports (the faster in a whole training step,
docs/performance.md), "torch" otherwise.
"""

from __future__ import annotations

import functools
import os

import torch

from lamamba_dist.ops.optional_kernels import triton_module


def snake_path_coords(n: int, k: int) -> list[tuple[int, int]]:
    """(row, col) visited at each step by direction k on an n x n map (docs/model.md §4)."""
    coords = []
    for s in range(n * n):
        q, m = divmod(s, n)
        sn = m if q % 2 == 0 else n - 1 - m
        if k == 0:
            rc = (q, sn)
        elif k == 1:
            rc = (n - 1 - q, sn)
        elif k == 2:
            rc = (n - 1 - sn, q)
        elif k == 3:
            rc = (n - 1 - sn, n - 1 - q)
        else:
            raise ValueError(f"direction k must be 0..3, got {k}")
        coords.append(rc)
    return coords


@functools.lru_cache(maxsize=None)
def _tables_cpu(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    paths = torch.empty(4, n * n, dtype=torch.long, device="cpu")  # explicit: immune to a device context
    for k in range(4):
        paths[k] = torch.tensor([r * n + c for r, c in snake_path_coords(n, k)], dtype=torch.long, device="cpu")
    inverse = torch.empty_like(paths)
    steps = torch.arange(n * n, device="cpu")
    for k in range(4):
        inverse[k, paths[k]] = steps  # inv_k[path_k(s)] = s
    return paths, inverse


_DEVICE_TABLES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def snake_tables(n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(paths, inverse), each (4, n*n) int64 on ``device``; built once per (n, device) and cached."""
    device = torch.device(device)
    key = (n, str(device))
    hit = _DEVICE_TABLES.get(key)
    if hit is None:
        paths, inverse = _tables_cpu(n)
        hit = (paths.to(device), inverse.to(device))
        if device.type == "meta":
            return hit
        _DEVICE_TABLES[key] = hit
    return hit


def _check_square(x: torch.Tensor) -> int:
    h, w = x.shape[-2:]
    if h != w:
        raise ValueError(f"snake scan needs a square map, got {h}x{w} (the official model supports square latents only)")
    return h


def _scan_gather(flat: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """(B, D, L) -> (B, 4, D, L) contiguous: out[:, k, :, s] = flat[:, :, paths[k, s]]."""
    b, d, length = flat.shape
    return torch.gather(flat.unsqueeze(1).expand(b, 4, d, length), -1,
                        paths.view(1, 4, 1, length).expand(b, 4, d, length))


def _merge_gather(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, 4, D, L) -> (B, D, L): sum_k y[:, k, :, inverse[k, p]]."""
    b, _, d, length = y.shape
    return torch.gather(y, -1, inverse.view(1, 4, 1, length).expand(b, 4, d, length)).sum(dim=1)


class _CrossScan(torch.autograd.Function):
    """The paths are permutations, so the adjoint of a gather along them is a gather along the inverse:
    no scatter_add (atomics) in the backward pass."""

    @staticmethod
    def forward(ctx, flat, paths, inverse):
        ctx.save_for_backward(inverse)
        return _scan_gather(flat, paths)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _merge_gather(grad, inverse), None, None


class _CrossMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, paths, inverse):
        ctx.save_for_backward(paths)
        return _merge_gather(y, inverse)

    @staticmethod
    def backward(ctx, grad):
        (paths,) = ctx.saved_tensors
        return _scan_gather(grad, paths), None, None


def cross_scan(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, D, N, N) -> (B, 4, D, N*N) contiguous: the map read along the four snake paths (one gather).

    ``tables`` = (paths, inverse) already on x's device (modules keep them as buffers, so compiled
    graphs see constants); otherwise they come from the per-(N, device) cache.
    """
    n = _check_square(x)
    b, d = x.shape[:2]
    paths, inverse = tables if tables is not None else snake_tables(n, x.device)
    return _CrossScan.apply(x.reshape(b, d, n * n), paths, inverse)


def cross_merge(y: torch.Tensor, n: int, tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, 4, D, N*N) -> (B, D, N*N): y[b,d,p] = sum_k Y_k[b,d,inv_k(p)] (one gather + sum)."""
    b, k, d, length = y.shape
    if k != 4 or length != n * n:
        raise ValueError(f"cross_merge expects (B, 4, D, {n * n}), got {tuple(y.shape)}")
    paths, inverse = tables if tables is not None else snake_tables(n, y.device)
    return _CrossMerge.apply(y, paths, inverse)


# ----------------------------------------------------------------------------- references


def cross_scan_reference(x: torch.Tensor) -> torch.Tensor:
    n = _check_square(x)
    seqs = []
    for k in range(4):
        coords = snake_path_coords(n, k)
        rows = torch.tensor([r for r, _ in coords], device=x.device)
        cols = torch.tensor([c for _, c in coords], device=x.device)
        seqs.append(x[:, :, rows, cols])  # (B, D, L)
    return torch.stack(seqs, dim=1)


def cross_merge_reference(y: torch.Tensor, n: int) -> torch.Tensor:
    b, _, d, _ = y.shape
    out = y.new_zeros(b, d, n, n)
    for k in range(4):
        for s, (r, c) in enumerate(snake_path_coords(n, k)):
            out[:, :, r, c] = out[:, :, r, c] + y[:, k, :, s]
    return out.reshape(b, d, n * n)


# ----------------------------------------------------------------------------- channels-last ends of SS2D's scan


# Resolved once at import (constants to torch.compile, like the scan modules in selective_scan.py).
_CROSS_TRITON = triton_module("cross_scan_triton")
SNAKE_BACKENDS = ("auto", "torch", "triton", "fused")
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # the kernels then run on CPU tensors (tests)


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    """Whether ``backend`` (one of SNAKE_BACKENDS) runs the Triton kernels on ``t``: "triton" and "fused" always (an
    error where they cannot), "auto" on CUDA tensors where triton imports (the faster in a whole training step,
    docs/performance.md), "torch" never."""
    if backend not in SNAKE_BACKENDS:
        raise ValueError(f"unknown snake backend {backend!r}; choose one of {', '.join(SNAKE_BACKENDS)}")
    if backend == "auto":
        return t.is_cuda and _CROSS_TRITON is not None
    if backend == "torch":
        return False
    if _CROSS_TRITON is None:
        raise RuntimeError(f"snake backend {backend!r} needs triton (it ships with CUDA builds of torch)")
    if not t.is_cuda and not _INTERPRET:
        raise ValueError(f"snake backend {backend!r} runs on CUDA tensors, got a {t.device.type} tensor: "
                         "use snake_backend 'auto' or 'torch' off the GPU")
    return True


def gather_cl_reference(x_cl: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (B, 4, D, L) contiguous: xs[:, k, :, s] = x_cl[:, paths[k, s], :] (transpose, then gather)."""
    return _scan_gather(x_cl.transpose(1, 2).contiguous(), paths)


def merge_cl_reference(ys: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, 4, D, L) -> (B, L, D) contiguous: sum_k ys[:, k, :, inverse[k, p]] at row p (gather, then transpose)."""
    return _merge_gather(ys, inverse).transpose(1, 2).contiguous()


def snake_gather_cl(x_cl: torch.Tensor, paths: torch.Tensor, inverse: torch.Tensor,
                    backend: str = "auto") -> torch.Tensor:
    """The channels-last map (B, L, D) read along the four snake paths: (B, 4, D, L) contiguous. ``paths`` /
    ``inverse`` from snake_tables, on x's device; ``backend`` one of SNAKE_BACKENDS. Differentiable; its adjoint is
    snake_merge_cl."""
    if _use_triton(backend, x_cl):
        return _CROSS_TRITON.gather_cl(x_cl, paths, inverse)
    return gather_cl_reference(x_cl, paths)


def snake_merge_cl(ys: torch.Tensor, paths: torch.Tensor, inverse: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """Four sequences (B, 4, D, L) summed back onto the channels-last map: (B, L, D) contiguous, in ys' dtype;
    ``backend`` one of SNAKE_BACKENDS. Differentiable; its adjoint is snake_gather_cl."""
    if _use_triton(backend, ys):
        return _CROSS_TRITON.merge_cl(ys, paths, inverse)
    return merge_cl_reference(ys, inverse)
