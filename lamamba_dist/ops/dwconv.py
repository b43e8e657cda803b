"""SS2D's depthwise convolution + SiLU: one dispatch point over the PyTorch path and the Triton kernel
(dwconv_triton.py, which documents both).

Backends: "torch" (``silu(conv2d(...))`` with a permuted copy of x, :func:`dwconv_silu_reference`), "triton" (one
pass reading x channels-last, dwconv_triton.py's row kernels where they apply; CUDA, or CPU under TRITON_INTERPRET=1),
"triton_tiles" (the same function through the tile kernels, kept for A/B runs) and "auto": "triton" for CUDA
tensors where triton imports (the faster in a whole compiled training step, docs/performance.md), "torch"
otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lamamba_dist.ops.optional_kernels import triton_module

CONV_BACKENDS = ("auto", "torch", "triton", "triton_tiles")
_TRITON_ALGOS = {"triton": "auto", "triton_tiles": "tiles"}


def dwconv_silu_reference(x: torch.Tensor, weight: torch.Tensor, out_bdl: bool = True) -> torch.Tensor:
    """``silu(conv2d(x, weight, padding=K // 2, groups=D))`` for channels-last x (B, H, W, D) and weight (D, 1, K, K),
    in PyTorch; (B, D, H, W) contiguous when ``out_bdl``, else (B, H, W, D) contiguous."""
    k = weight.shape[-1]
    if out_bdl:
        return F.silu(F.conv2d(x.permute(0, 3, 1, 2).contiguous(), weight, padding=k // 2, groups=weight.shape[0]))
    # the NCHW view of a contiguous NHWC tensor: the convolution keeps channels-last, and the permute back is free
    y = F.silu(F.conv2d(x.contiguous().permute(0, 3, 1, 2), weight, padding=k // 2, groups=weight.shape[0]))
    return y.permute(0, 2, 3, 1).contiguous()


_DWCONV_TRITON = triton_module("dwconv_triton")  # resolved once at import (a constant to torch.compile)


def dwconv_silu(x: torch.Tensor, weight: torch.Tensor, out_bdl: bool = True, backend: str = "auto") -> torch.Tensor:
    """The dispatch point: see the module docstring. x (B, H, W, D), any strides; weight (D, 1, K, K)."""
    if backend not in CONV_BACKENDS:
        raise ValueError(f"unknown conv backend {backend!r}; choose one of {', '.join(CONV_BACKENDS)}")
    if backend == "auto":
        backend = "triton" if x.is_cuda and _DWCONV_TRITON is not None else "torch"
    if backend in _TRITON_ALGOS:
        if _DWCONV_TRITON is None:
            raise RuntimeError(f"conv backend {backend!r} needs triton (it ships with CUDA builds of torch)")
        return _DWCONV_TRITON.dwconv_silu_triton(x, weight, out_bdl, _TRITON_ALGOS[backend])
    return dwconv_silu_reference(x, weight, out_bdl)
