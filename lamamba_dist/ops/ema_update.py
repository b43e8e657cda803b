"""The EMA update ``s := s * d + w * (1 - d)`` over flat fp32 buffers, in one pass on CUDA.

DiT's ``update_ema`` is two kernels per tensor: ``ema.mul_(decay)`` (reads and writes the shadow) and
``.add_(w, alpha=1 - decay)`` (reads the shadow and the weights, writes the shadow): 20 bytes per fp32
parameter. For LaMamba-XL or DiT-XL/2 (675M parameters) that is 13.5 GB per optimizer step, about as much
memory traffic as the fused AdamW step itself. :func:`ema_update_` reads each shadow and weight element once
and writes the shadow once (12 bytes per parameter) and rounds as the two kernels do: the product
``s * d`` rounded to fp32 (torch's ``mul`` kernel), then ``w * alpha + that`` as one fused multiply-add
(torch's CUDA ``add`` with ``alpha`` computes ``a + b * alpha``, which nvcc contracts into one FMA). So the
result equals :func:`ema_update_reference` bit for bit (tests/ops/test_ops.py on the GPU).

Where the kernel does not apply (CPU tensors, other dtypes, triton missing) :func:`ema_update_` runs the
reference: the two torch ops.
"""

from __future__ import annotations

import torch

try:  # triton ships with CUDA builds of torch; CPU CI may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

BLOCK = 4096


def ema_update_reference(shadow: torch.Tensor, weight: torch.Tensor, decay: float) -> torch.Tensor:
    """DiT's update, in place: ``shadow.mul_(decay).add_(weight, alpha=1 - decay)``."""
    return shadow.mul_(decay).add_(weight, alpha=1.0 - decay)


if triton is not None:

    @triton.jit
    def _ema_kernel(s_ptr, w_ptr, n, decay, alpha, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        s = tl.load(s_ptr + offs, mask=mask)
        w = tl.load(w_ptr + offs, mask=mask)
        kept = s * decay  # rounded on its own, as torch's mul_ kernel does
        tl.store(s_ptr + offs, tl.fma(w, alpha, kept), mask=mask)


def kernel_applies(shadow: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`ema_update_` runs the one-pass kernel for these tensors."""
    return (triton is not None and shadow.device.type == "cuda" and weight.device == shadow.device
            and shadow.dtype == torch.float32 and weight.dtype == torch.float32
            and shadow.is_contiguous() and weight.is_contiguous() and shadow.numel() == weight.numel())


def ema_update_(shadow: torch.Tensor, weight: torch.Tensor, decay: float, *, use_kernel: bool | None = None) -> torch.Tensor:
    """``shadow := shadow * decay + weight * (1 - decay)`` in place (fp32); returns ``shadow``.

    ``use_kernel``: None picks the one-pass kernel where it applies (:func:`kernel_applies`); True requires it
    (the interpreter tests run it on CPU tensors under TRITON_INTERPRET=1); False runs the reference."""
    if use_kernel is None:
        use_kernel = kernel_applies(shadow, weight)
    if not use_kernel:
        return ema_update_reference(shadow, weight, decay)
    if triton is None:
        raise RuntimeError("the one-pass EMA kernel needs triton")
    if shadow.numel() != weight.numel() or not (shadow.is_contiguous() and weight.is_contiguous()):
        raise ValueError(f"EMA update: shadow {tuple(shadow.shape)} and weight {tuple(weight.shape)} must be "
                         "contiguous with the same number of elements")
    n = shadow.numel()
    if n:
        decay = float(decay)
        _ema_kernel[(triton.cdiv(n, BLOCK),)](shadow, weight, n, decay, 1.0 - decay, BLOCK=BLOCK)
    return shadow
