"""SS2D's depthwise convolution and SiLU in Triton, read channels-last: ``silu(conv2d(x, w, groups=D))``.

SS2D (models/lamamba.py, docs/model.md §3) splits ``in_proj``'s channels-last output (B, H, W, 2D) into x and the
gate z, and runs x through a K x K depthwise convolution (no bias) and SiLU before the scan. In PyTorch that is a
permuted copy of x into NCHW, the convolution (ATen's depthwise kernels for bf16: their backward was 14 ms of an
eager LaMamba-XL step at 256 px, batch 64, docs/performance.md), and SiLU's own pass. Here one kernel reads x where
``in_proj`` left it (any strides with unit channel stride, so the half of in_proj's output is read in place),
accumulates the K*K taps in fp32, applies SiLU and writes the result once, in the layout the next step wants:

* ``out_bdl=True``: (B, D, H, W), the sequence scan's (B, D, L) (the cross-scan path);
* ``out_bdl=False``: (B, H, W, D) channels-last (the gathered "ss2d_*" path).

Backward, two kernels, no atomics:
  1. per (batch, pixel block, channel block): recompute the pre-activation s, gs = gy * silu'(s) (in fp32, written
     channels-last (B, H*W, D) in x's dtype), and this program's share of the weight gradient from the fp32 gs,
     gw[c, tap] = sum over its pixels of gs * x(pixel + tap), to an fp32 partial buffer that torch then sums in a
     fixed order (deterministic);
  2. gx[b, p, c] = sum over taps of w[c, tap] * gs[b, p - tap, c] (zero outside the map).
silu'(s) = sigmoid(s) (1 + s (1 - sigmoid(s))).

Numerics: the taps accumulate in fp32 and SiLU acts on the fp32 sum, rounded once to x's dtype (PyTorch rounds the
convolution's output to bf16 before SiLU): within bf16 rounding of the reference, tests/ops/test_dwconv_triton.py.

Exposed as the custom ops ``lamamba::dwconv_silu_fwd`` / ``lamamba::dwconv_silu_bwd`` (fake kernels + autograd),
so torch.compile traces through without a graph break, and as :func:`dwconv_silu_triton`. The pure-PyTorch
reference is ``dwconv_silu_reference`` (lamamba_dist/ops/dwconv.py, the dispatch point). Importing this module imports triton; under TRITON_INTERPRET=1 (set
before the import) the kernels run on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_P = 64  # pixels per program
BLOCK_D = 32  # channels per program (64 bytes of bf16 per pixel: two 32-byte sectors)
# Launch configurations, (pixels, channels, warps) per program, of the forward kernel and the two backward ones,
# and the dtype of the backward's intermediate gradient gs. `lamamba bench kernels --what conv --sweep` times the
# alternatives; on one H100 (2026-12-06) at LaMamba-XL's 256 px shapes (batch 64; d_inner x map side 640x32,
# 1280x16, 2560x8) two warps for the gs kernel made the whole backward 0.58 / 0.31 / 0.16 ms against 0.84 / 0.44 /
# 0.23 with four; the forward and gx kernels were within 3% of their best. gs in bf16 on two warps: 0.520 / 0.276 /
# 0.164 ms against fp32's 0.575 / 0.308 / 0.165 (one H100, 2026-12-07), 7% of the backward over LaMamba-XL's 22
# blocks. bf16 is the rounding PyTorch's own path gives this gradient (SiLU's backward returns bf16 before the
# convolution's backward reads it); the weight gradient is taken from the fp32 gs before it is rounded.
FWD_CONFIG = (BLOCK_P, BLOCK_D, 4)
GS_CONFIG = (BLOCK_P, BLOCK_D, 2)
GX_CONFIG = (BLOCK_P, BLOCK_D, 4)
GS_DTYPE = None  # None: x's dtype (bf16 in bf16 training, fp32 in fp32)
# The weight gradient's partial sums in the gx kernel (from its shifted reads of gs) instead of the gs kernel (K*K
# more reads of x): slower on one H100 (0.731 / 0.384 / 0.192 ms for the backward with fp32 gs, against 0.575 /
# 0.308 / 0.165), so off; the sweep times both.
GW_IN_GX = False


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile(pid_p, pid_d, H, W, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    return p, p // W, p % W, c, p < H * W, c < D


@triton.jit
def _tap(x_base, py, px, c, pmask, cmask, H, W, sxh, sxw, dy, dx):
    """x at the tile's pixels shifted by (dy, dx), zero outside the map (fp32, (BLOCK_P, BLOCK_D))."""
    iy = py + dy
    ix = px + dx
    ok = pmask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    return tl.load(x_base + (iy * sxh + ix * sxw)[:, None] + c[None, :], mask=ok[:, None] & cmask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _preact(x_base, w_ptr, py, px, c, pmask, cmask, H, W, sxh, sxw,
            K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """The convolution's output s at the tile's pixels (fp32, (BLOCK_P, BLOCK_D))."""
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for ky in tl.static_range(K):
        for kx in tl.static_range(K):
            xv = _tap(x_base, py, px, c, pmask, cmask, H, W, sxh, sxw, ky - K // 2, kx - K // 2)
            wv = tl.load(w_ptr + c * (K * K) + (ky * K + kx), mask=cmask, other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
    return acc


@triton.jit
def _dwconv_fwd_kernel(x_ptr, w_ptr, y_ptr, H, W, D, n_pblk, sxb, sxh, sxw,
                K: tl.constexpr, OUT_BDL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_pblk
    p, py, px, c, pmask, cmask = _tile(pid % n_pblk, tl.program_id(1), H, W, D, BLOCK_P, BLOCK_D)
    s = _preact(x_ptr + b.to(tl.int64) * sxb, w_ptr, py, px, c, pmask, cmask, H, W, sxh, sxw, K, BLOCK_P, BLOCK_D)
    y = s * tl.sigmoid(s)
    L = H * W
    base = y_ptr + b.to(tl.int64) * L * D
    if OUT_BDL:
        offs = c[None, :] * L + p[:, None]
    else:
        offs = p[:, None] * D + c[None, :]
    tl.store(base + offs, y.to(y_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _dwconv_bwd_gs_kernel(x_ptr, w_ptr, gy_ptr, gs_ptr, gw_ptr, H, W, D, n_pblk, sxb, sxh, sxw,
                   K: tl.constexpr, OUT_BDL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                   WITH_GW: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_pblk
    p, py, px, c, pmask, cmask = _tile(pid % n_pblk, tl.program_id(1), H, W, D, BLOCK_P, BLOCK_D)
    x_base = x_ptr + b.to(tl.int64) * sxb
    s = _preact(x_base, w_ptr, py, px, c, pmask, cmask, H, W, sxh, sxw, K, BLOCK_P, BLOCK_D)
    L = H * W
    m2 = pmask[:, None] & cmask[None, :]
    if OUT_BDL:
        g_offs = c[None, :] * L + p[:, None]
    else:
        g_offs = p[:, None] * D + c[None, :]
    gy = tl.load(gy_ptr + b.to(tl.int64) * L * D + g_offs, mask=m2, other=0.0).to(tl.float32)
    sig = tl.sigmoid(s)
    gs = gy * sig * (1.0 + s * (1.0 - sig))
    gs = tl.where(m2, gs, 0.0)
    tl.store(gs_ptr + b.to(tl.int64) * L * D + p[:, None] * D + c[None, :], gs.to(gs_ptr.dtype.element_ty), mask=m2)
    if WITH_GW:
        # this program's share of the weight gradient, one row of K*K taps per channel
        gw_base = gw_ptr + pid.to(tl.int64) * D * (K * K)
        for ky in tl.static_range(K):
            for kx in tl.static_range(K):
                xv = _tap(x_base, py, px, c, pmask, cmask, H, W, sxh, sxw, ky - K // 2, kx - K // 2)
                tl.store(gw_base + c * (K * K) + (ky * K + kx), tl.sum(gs * xv, axis=0), mask=cmask)


@triton.jit
def _dwconv_bwd_gx_kernel(gs_ptr, w_ptr, gx_ptr, x_ptr, gw_ptr, H, W, D, n_pblk, sxb, sxh, sxw,
                   K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, WITH_GW: tl.constexpr):
    # WITH_GW: the weight gradient from the same shifted reads of gs, against x at this tile's own pixels:
    # gw[c, tap] = sum_p gs[p, c] x[p + tap, c] = sum_q gs[q - tap, c] x[q, c] (both zero outside the map)
    pid = tl.program_id(0)
    b = pid // n_pblk
    p, py, px, c, pmask, cmask = _tile(pid % n_pblk, tl.program_id(1), H, W, D, BLOCK_P, BLOCK_D)
    base = b.to(tl.int64) * H * W * D
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    if WITH_GW:
        xv = _tap(x_ptr + b.to(tl.int64) * sxb, py, px, c, pmask, cmask, H, W, sxh, sxw, 0, 0)
        gw_base = gw_ptr + pid.to(tl.int64) * D * (K * K)
    for ky in tl.static_range(K):
        for kx in tl.static_range(K):
            oy = py - (ky - K // 2)  # the output pixel that read this one through tap (ky, kx)
            ox = px - (kx - K // 2)
            ok = pmask & (oy >= 0) & (oy < H) & (ox >= 0) & (ox < W)
            g = tl.load(gs_ptr + base + (oy * W + ox)[:, None] * D + c[None, :], mask=ok[:, None] & cmask[None, :],
                        other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + c * (K * K) + (ky * K + kx), mask=cmask, other=0.0).to(tl.float32)
            acc += g * wv[None, :]
            if WITH_GW:
                tl.store(gw_base + c * (K * K) + (ky * K + kx), tl.sum(g * xv, axis=0), mask=cmask)
    tl.store(gx_ptr + base + p[:, None] * D + c[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=pmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------- launchers


def _check(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, W, D), got shape {tuple(x.shape)}")
    b, h, w, d = x.shape
    k = weight.shape[-1]
    if weight.shape != (d, 1, k, k) or k % 2 == 0:
        raise ValueError(f"weight must be ({d}, 1, K, K) with K odd, got {tuple(weight.shape)}")
    return b, h, w, d, k


def _grid(b, h, w, d, block_p=BLOCK_P, block_d=BLOCK_D):
    n_pblk = triton.cdiv(h * w, block_p)
    return n_pblk, (b * n_pblk, triton.cdiv(d, block_d))


def _config(config) -> tuple[int, int, int]:
    """A launch configuration (pixels, channels, warps per program), checked: powers of two."""
    block_p, block_d, num_warps = config
    for name, v in (("pixels", block_p), ("channels", block_d), ("warps", num_warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"dwconv launch config: {name} must be a power of two, got {v}")
    return block_p, block_d, num_warps


def _unit_channel_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its channels are adjacent in memory (any other strides: read in place), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def dwconv_silu_fwd_launch(x: torch.Tensor, weight: torch.Tensor, out_bdl: bool, config=None) -> torch.Tensor:
    """The forward kernel. ``config``: (pixels, channels, warps) per program (default FWD_CONFIG)."""
    b, h, w, d, k = _check(x, weight)
    x = _unit_channel_stride(x)
    bp, bd, nw = _config(config or FWD_CONFIG)
    y = torch.empty((b, d, h, w) if out_bdl else (b, h, w, d), device=x.device, dtype=x.dtype)
    n_pblk, grid = _grid(b, h, w, d, bp, bd)
    _dwconv_fwd_kernel[grid](x, weight.contiguous(), y, h, w, d, n_pblk, x.stride(0), x.stride(1), x.stride(2),
                             K=k, OUT_BDL=bool(out_bdl), BLOCK_P=bp, BLOCK_D=bd, num_warps=nw)
    return y


def dwconv_silu_bwd_launch(x: torch.Tensor, weight: torch.Tensor, gy: torch.Tensor, out_bdl: bool,
                           gs_config=None, gx_config=None, gs_dtype=None,
                           gw_in_gx=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two backward kernels and the weight gradient's deterministic sum: (gx, gw). ``gs_config`` /
    ``gx_config``: (pixels, channels, warps) of each kernel (default GS_CONFIG / GX_CONFIG); ``gs_dtype``: the
    dtype of the intermediate gradient gs (default GS_DTYPE; None there: x's dtype); ``gw_in_gx``: the weight
    gradient's partial sums taken by the gx kernel (from its shifted reads of gs) instead of the gs kernel (from K*K
    more reads of x) (default GW_IN_GX)."""
    b, h, w, d, k = _check(x, weight)
    x = _unit_channel_stride(x)
    weight = weight.contiguous()
    gy = gy.contiguous()
    in_gx = GW_IN_GX if gw_in_gx is None else bool(gw_in_gx)
    bp, bd, nw = _config(gs_config or GS_CONFIG)
    n_pblk, grid = _grid(b, h, w, d, bp, bd)
    gs = torch.empty(b, h * w, d, device=x.device, dtype=gs_dtype or GS_DTYPE or x.dtype)
    gw_part = None if in_gx else torch.empty(grid[0], d, k * k, device=x.device, dtype=torch.float32)
    _dwconv_bwd_gs_kernel[grid](x, weight, gy, gs, gs if in_gx else gw_part, h, w, d, n_pblk, x.stride(0),
                                x.stride(1), x.stride(2), K=k, OUT_BDL=bool(out_bdl), BLOCK_P=bp, BLOCK_D=bd,
                                WITH_GW=not in_gx, num_warps=nw)
    gx = torch.empty(b, h, w, d, device=x.device, dtype=x.dtype)
    bp, bd, nw = _config(gx_config or GX_CONFIG)
    n_pblk, grid = _grid(b, h, w, d, bp, bd)
    if in_gx:
        gw_part = torch.empty(grid[0], d, k * k, device=x.device, dtype=torch.float32)
    _dwconv_bwd_gx_kernel[grid](gs, weight, gx, x, gw_part if in_gx else gx, h, w, d, n_pblk, x.stride(0),
                                x.stride(1), x.stride(2), K=k, BLOCK_P=bp, BLOCK_D=bd, WITH_GW=in_gx, num_warps=nw)
    gw = gw_part.sum(0).view(d, 1, k, k).to(weight.dtype)
    return gx, gw


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("lamamba::dwconv_silu_fwd", mutates_args=())
def _dwconv_fwd(x: torch.Tensor, weight: torch.Tensor, out_bdl: bool) -> torch.Tensor:
    return dwconv_silu_fwd_launch(x, weight, out_bdl)


@_dwconv_fwd.register_fake
def _(x, weight, out_bdl):
    b, h, w, d = x.shape
    return x.new_empty((b, d, h, w) if out_bdl else (b, h, w, d))


@torch.library.custom_op("lamamba::dwconv_silu_bwd", mutates_args=())
def _dwconv_bwd(x: torch.Tensor, weight: torch.Tensor, gy: torch.Tensor,
                out_bdl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return dwconv_silu_bwd_launch(x, weight, gy, out_bdl)


@_dwconv_bwd.register_fake
def _(x, weight, gy, out_bdl):
    return x.new_empty(x.shape), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, out_bdl = inputs
    ctx.save_for_backward(x, weight)
    ctx.out_bdl = out_bdl


def _backward(ctx, gy):
    x, weight = ctx.saved_tensors
    gx, gw = _dwconv_bwd(x, weight, gy, ctx.out_bdl)
    return gx, gw, None


_dwconv_fwd.register_autograd(_backward, setup_context=_setup_context)


def dwconv_silu_triton(x: torch.Tensor, weight: torch.Tensor, out_bdl: bool = True) -> torch.Tensor:
    """``silu(depthwise conv(x))`` through the Triton kernels (custom op with autograd): x (B, H, W, D) with any
    strides (a copy only when the channel stride is not 1), weight (D, 1, K, K), K odd; the output in x's dtype,
    (B, D, H, W) when ``out_bdl`` else (B, H, W, D)."""
    return _dwconv_fwd(x, weight.to(x.dtype) if weight.dtype != x.dtype else weight, bool(out_bdl))
