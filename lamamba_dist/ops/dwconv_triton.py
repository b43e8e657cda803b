"""SS2D's depthwise convolution and SiLU in Triton, read channels-last: ``silu(conv2d(x, w, groups=D))``.

SS2D (models/lamamba.py, docs/model.md §3) splits ``in_proj``'s channels-last output (B, H, W, 2D) into x and the
gate z, and runs x through a K x K depthwise convolution (no bias) and SiLU before the scan. In PyTorch that is a
permuted copy of x into NCHW, the convolution (ATen's depthwise kernels for bf16: their backward was 14 ms of an
eager LaMamba-XL step at 256 px, batch 64, docs/performance.md), and SiLU's own pass. Here one kernel reads x where
``in_proj`` left it (any strides with unit channel stride, so the half of in_proj's output is read in place),
accumulates the K*K taps in fp32, applies SiLU and writes the result once, in the layout the next step wants:

* ``out_bdl=True``: (B, D, H, W), the sequence scan's (B, D, L) (the cross-scan path);
* ``out_bdl=False``: (B, H, W, D) channels-last (the SS2D core's default path, and the gathered "ss2d_*" scans).

Two families of kernels compute it (``ALGO``): the row kernels, where a program walks ROWS image rows of BLOCK_D
channels pixel by pixel with the 3 x 3 window in registers (each input loaded and converted once per row, the weight
gradient summed in registers), and the tile kernels (any odd K), where a program computes a tile of pixels x
channels with one masked load of the shifted tile per tap. Both follow the same plan. "auto" (the default) takes
the rows for K = 3 with channels-last output and gradient, where each step's loads and stores are runs of adjacent
channels, and the tiles otherwise (with ``out_bdl`` the rows would store and read one channel's pixels L apart).

Backward, two kernels, no atomics:
  1. per program (batch, pixel or row block, channel block): recompute the pre-activation s, gs = gy * silu'(s)
     (in fp32, written channels-last (B, H*W, D) in x's dtype), and this program's share of the weight gradient from the fp32 gs,
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
# The kernels: "rows" (K = 3: a program walks image rows with the 3 x 3 window in registers, see the row kernels
# below; other K run the tiles), "tiles" (a program computes a tile of pixels x channels, each tap a masked load of
# the shifted tile) or "auto" (the rows for K = 3 with channels-last output, else the tiles: the module docstring).
# The row kernels' launch configurations are (channels, rows, warps) per program. On one H100
# (2026-12-07, bf16, channels-last, batch 64; d_inner x side 640x32 / 1280x16 / 2560x8) the rows took 0.097 / 0.054 /
# 0.033 ms forward against the tiles' 0.142 / 0.081 / 0.048, and the backward (gs on (128, 2, 1)) 0.330 / 0.211 /
# 0.149 against 0.527 / 0.280 / 0.166; four rows a gs program made it 0.334 / 0.185 / 0.121 (fewer partial sums of
# the weight gradient on the small maps). One channel block of 128 on one warp was within 5% of the best forward
# and gx configuration at every shape.
ALGOS = ("auto", "rows", "tiles")
ALGO = "auto"
ROWS_FWD_CONFIG = (128, 1, 1)
ROWS_GS_CONFIG = (128, 4, 1)
ROWS_GX_CONFIG = (128, 1, 1)


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


# The row kernels (K = 3): a program owns ROWS image rows of one batch element and BLOCK_D channels, and walks each
# row along its pixels with the 3 x 3 window of x in registers: a step loads one new column of three pixels (one
# vector of adjacent channels each, the load of the column after it issued a step ahead), so each input is read and
# converted once per row instead of once per tap, the taps' masks are per program and per step rather than per
# element, and the weight gradient's sums over pixels stay in each thread's registers until the program ends (the
# tile kernels above reduce them across threads, nine times a tile).


@triton.jit
def _rows_program(n_rblk, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A row program's place: (program id, batch element, first row, its channels, their mask)."""
    pid = tl.program_id(0)
    y0 = (pid % n_rblk) * ROWS
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return pid, pid // n_rblk, y0, c, c < D


@triton.jit
def _col3(base, yy, xx, c, cmask, H, W, sh, sw):
    """The column xx of rows yy-1, yy, yy+1 ((BLOCK_D,) each, the input's dtype), zero outside the map."""
    inside = (xx >= 0) & (xx < W)
    ptr = base + (yy * sh + xx * sw) + c
    top = tl.load(ptr - sh, mask=cmask & inside & (yy > 0), other=0.0)
    mid = tl.load(ptr, mask=cmask & inside, other=0.0)
    bot = tl.load(ptr + sh, mask=cmask & inside & (yy + 1 < H), other=0.0)
    return top, mid, bot


@triton.jit
def _wtap(wp, tap, cmask):
    return tl.load(wp + tap, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _w3(w_ptr, c, cmask):
    """The nine taps' weights of the program's channels (fp32), row-major (ky, kx)."""
    wp = w_ptr + c * 9
    return (_wtap(wp, 0, cmask), _wtap(wp, 1, cmask), _wtap(wp, 2, cmask), _wtap(wp, 3, cmask), _wtap(wp, 4, cmask),
            _wtap(wp, 5, cmask), _wtap(wp, 6, cmask), _wtap(wp, 7, cmask), _wtap(wp, 8, cmask))


@triton.jit
def _dwconv_fwd_rows_kernel(x_ptr, w_ptr, y_ptr, H, W, D, n_rblk, sxb, sxh, sxw,
                            OUT_BDL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # column j of the window (rows y-1, y, y+1) adds to the outputs at x = j+1, j, j-1 through the taps' columns
    # kx = 0, 1, 2: each column's three dot products are added to two running sums, the first of which is done
    pid, b, y0, c, cmask = _rows_program(n_rblk, D, ROWS, BLOCK_D)
    xb = x_ptr + b.to(tl.int64) * sxb
    L = H * W
    yb = y_ptr + b.to(tl.int64) * L * D
    w00, w01, w02, w10, w11, w12, w20, w21, w22 = _w3(w_ptr, c, cmask)
    for yy in range(y0, tl.minimum(y0 + ROWS, H)):
        t, m, u = _col3(xb, yy, 0, c, cmask, H, W, sxh, sxw)
        t = t.to(tl.float32)
        m = m.to(tl.float32)
        u = u.to(tl.float32)
        acc = w01 * t + w11 * m + w21 * u  # the output at x = 0 so far
        nxt = w00 * t + w10 * m + w20 * u  # the output at x = 1 so far
        p0, p1, p2 = _col3(xb, yy, 1, c, cmask, H, W, sxh, sxw)
        for xx in range(0, W):
            t = p0.to(tl.float32)  # column xx + 1
            m = p1.to(tl.float32)
            u = p2.to(tl.float32)
            p0, p1, p2 = _col3(xb, yy, xx + 2, c, cmask, H, W, sxh, sxw)  # a step ahead
            s = acc + (w02 * t + w12 * m + w22 * u)
            acc = nxt + (w01 * t + w11 * m + w21 * u)
            nxt = w00 * t + w10 * m + w20 * u
            out = (s * tl.sigmoid(s)).to(y_ptr.dtype.element_ty)
            pix = yy * W + xx
            if OUT_BDL:
                tl.store(yb + c * L + pix, out, mask=cmask)
            else:
                tl.store(yb + pix * D + c, out, mask=cmask)


@triton.jit
def _gy_at(gyb, pix, mask, L, D, c, OUT_BDL: tl.constexpr):
    """The output gradient at pixel ``pix`` ((BLOCK_D,), its dtype), zero where ``mask`` is off."""
    if OUT_BDL:
        return tl.load(gyb + c * L + pix, mask=mask, other=0.0)
    return tl.load(gyb + pix * D + c, mask=mask, other=0.0)


@triton.jit
def _dwconv_bwd_gs_rows_kernel(x_ptr, w_ptr, gy_ptr, gs_ptr, gw_ptr, H, W, D, n_rblk, sxb, sxh, sxw,
                               OUT_BDL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # gs = gy * silu'(s) at each pixel, and this program's share of the weight gradient,
    # gw[c, ky, kx] = sum over its pixels of gs * x(pixel + (ky - 1, kx - 1)), summed in registers
    pid, b, y0, c, cmask = _rows_program(n_rblk, D, ROWS, BLOCK_D)
    xb = x_ptr + b.to(tl.int64) * sxb
    L = H * W
    gyb = gy_ptr + b.to(tl.int64) * L * D
    gsb = gs_ptr + b.to(tl.int64) * L * D
    w00, w01, w02, w10, w11, w12, w20, w21, w22 = _w3(w_ptr, c, cmask)
    g00 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    g01 = g00
    g02 = g00
    g10 = g00
    g11 = g00
    g12 = g00
    g20 = g00
    g21 = g00
    g22 = g00
    for yy in range(y0, tl.minimum(y0 + ROWS, H)):
        a0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        a1 = a0
        a2 = a0
        m0, m1, m2 = _col3(xb, yy, 0, c, cmask, H, W, sxh, sxw)
        m0 = m0.to(tl.float32)
        m1 = m1.to(tl.float32)
        m2 = m2.to(tl.float32)
        p0, p1, p2 = _col3(xb, yy, 1, c, cmask, H, W, sxh, sxw)
        q = _gy_at(gyb, yy * W, cmask, L, D, c, OUT_BDL)
        for xx in range(0, W):
            n0 = p0.to(tl.float32)
            n1 = p1.to(tl.float32)
            n2 = p2.to(tl.float32)
            p0, p1, p2 = _col3(xb, yy, xx + 2, c, cmask, H, W, sxh, sxw)
            pix = yy * W + xx
            gy = q.to(tl.float32)
            q = _gy_at(gyb, pix + 1, cmask & (xx + 1 < W), L, D, c, OUT_BDL)  # a step ahead too
            s = (w00 * a0 + w01 * m0 + w02 * n0) + (w10 * a1 + w11 * m1 + w12 * n1) + (w20 * a2 + w21 * m2 + w22 * n2)
            sig = tl.sigmoid(s)
            gs = gy * sig * (1.0 + s * (1.0 - sig))
            tl.store(gsb + pix * D + c, gs.to(gs_ptr.dtype.element_ty), mask=cmask)
            g00 += gs * a0
            g01 += gs * m0
            g02 += gs * n0
            g10 += gs * a1
            g11 += gs * m1
            g12 += gs * n1
            g20 += gs * a2
            g21 += gs * m2
            g22 += gs * n2
            a0, a1, a2 = m0, m1, m2
            m0, m1, m2 = n0, n1, n2
    gp = gw_ptr + pid.to(tl.int64) * D * 9 + c * 9
    tl.store(gp + 0, g00, mask=cmask)
    tl.store(gp + 1, g01, mask=cmask)
    tl.store(gp + 2, g02, mask=cmask)
    tl.store(gp + 3, g10, mask=cmask)
    tl.store(gp + 4, g11, mask=cmask)
    tl.store(gp + 5, g12, mask=cmask)
    tl.store(gp + 6, g20, mask=cmask)
    tl.store(gp + 7, g21, mask=cmask)
    tl.store(gp + 8, g22, mask=cmask)


@triton.jit
def _dwconv_bwd_gx_rows_kernel(gs_ptr, w_ptr, gx_ptr, H, W, D, n_rblk,
                               ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # gx[y, x] = sum over taps of w[ky, kx] gs[y - (ky - 1), x - (kx - 1)]: as the forward over gs (B, H*W, D) with
    # the taps mirrored (row ky = 0 reads the row below, column kx = 0 the column to the right)
    pid, b, y0, c, cmask = _rows_program(n_rblk, D, ROWS, BLOCK_D)
    L = H * W
    gsb = gs_ptr + b.to(tl.int64) * L * D
    gxb = gx_ptr + b.to(tl.int64) * L * D
    w00, w01, w02, w10, w11, w12, w20, w21, w22 = _w3(w_ptr, c, cmask)
    for yy in range(y0, tl.minimum(y0 + ROWS, H)):
        t, m, u = _col3(gsb, yy, 0, c, cmask, H, W, W * D, D)
        t = t.to(tl.float32)
        m = m.to(tl.float32)
        u = u.to(tl.float32)
        acc = w01 * u + w11 * m + w21 * t  # gx at x = 0 so far
        nxt = w02 * u + w12 * m + w22 * t  # gx at x = 1 so far
        p0, p1, p2 = _col3(gsb, yy, 1, c, cmask, H, W, W * D, D)
        for xx in range(0, W):
            t = p0.to(tl.float32)
            m = p1.to(tl.float32)
            u = p2.to(tl.float32)
            p0, p1, p2 = _col3(gsb, yy, xx + 2, c, cmask, H, W, W * D, D)
            g = acc + (w00 * u + w10 * m + w20 * t)
            acc = nxt + (w01 * u + w11 * m + w21 * t)
            nxt = w02 * u + w12 * m + w22 * t
            tl.store(gxb + (yy * W + xx) * D + c, g.to(gx_ptr.dtype.element_ty), mask=cmask)


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
    _powers_of_two("dwconv launch config", pixels=block_p, channels=block_d, warps=num_warps)
    return block_p, block_d, num_warps


def _powers_of_two(what: str, **values: int) -> None:
    for name, v in values.items():
        if v < 1 or v & (v - 1):
            raise ValueError(f"{what}: {name} must be a power of two, got {v}")


def _unit_channel_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its channels are adjacent in memory (any other strides: read in place), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _use_rows(k: int, algo: str | None, out_bdl: bool) -> bool:
    """Whether the row kernels run: "rows" for K = 3, "auto" for K = 3 with channels-last output (module docstring)."""
    algo = algo or ALGO
    if algo not in ALGOS:
        raise ValueError(f"dwconv kernels: unknown algo {algo!r}; choose one of {', '.join(ALGOS)}")
    return k == 3 and (algo == "rows" or (algo == "auto" and not out_bdl))


def _rows_config(config) -> tuple[int, int, int]:
    """A row kernel's launch configuration (channels, rows, warps per program), checked."""
    block_d, rows, num_warps = config
    _powers_of_two("dwconv row-kernel config", channels=block_d, warps=num_warps)
    if rows < 1:
        raise ValueError(f"dwconv row-kernel config: rows must be at least 1, got {rows}")
    return block_d, rows, num_warps


def _rows_grid(b, h, d, block_d, rows):
    n_rblk = triton.cdiv(h, rows)
    return n_rblk, (b * n_rblk, triton.cdiv(d, block_d))


def dwconv_silu_fwd_launch(x: torch.Tensor, weight: torch.Tensor, out_bdl: bool, config=None,
                           algo: str | None = None) -> torch.Tensor:
    """The forward kernel. ``algo``: "auto", "rows" or "tiles" (default ALGO; "rows" runs for K = 3 only, see
    _use_rows). ``config``: the launch configuration, (pixels, channels, warps) per program for the tiles (default
    FWD_CONFIG), (channels, rows, warps) for the rows (default ROWS_FWD_CONFIG)."""
    b, h, w, d, k = _check(x, weight)
    x = _unit_channel_stride(x)
    y = torch.empty((b, d, h, w) if out_bdl else (b, h, w, d), device=x.device, dtype=x.dtype)
    if _use_rows(k, algo, out_bdl):
        bd, rows, nw = _rows_config(config or ROWS_FWD_CONFIG)
        n_rblk, grid = _rows_grid(b, h, d, bd, rows)
        _dwconv_fwd_rows_kernel[grid](x, weight.contiguous(), y, h, w, d, n_rblk, x.stride(0), x.stride(1),
                                      x.stride(2), OUT_BDL=bool(out_bdl), ROWS=rows, BLOCK_D=bd, num_warps=nw)
        return y
    bp, bd, nw = _config(config or FWD_CONFIG)
    n_pblk, grid = _grid(b, h, w, d, bp, bd)
    _dwconv_fwd_kernel[grid](x, weight.contiguous(), y, h, w, d, n_pblk, x.stride(0), x.stride(1), x.stride(2),
                             K=k, OUT_BDL=bool(out_bdl), BLOCK_P=bp, BLOCK_D=bd, num_warps=nw)
    return y


def dwconv_silu_bwd_launch(x: torch.Tensor, weight: torch.Tensor, gy: torch.Tensor, out_bdl: bool,
                           gs_config=None, gx_config=None, gs_dtype=None,
                           gw_in_gx=None, algo: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two backward kernels and the weight gradient's deterministic sum: (gx, gw). ``algo``: "auto", "rows" or
    "tiles" (default ALGO; "rows" runs for K = 3 only, see _use_rows). ``gs_config`` / ``gx_config``: each kernel's
    launch configuration (tiles: (pixels, channels, warps), default GS_CONFIG / GX_CONFIG; rows: (channels, rows,
    warps), default ROWS_GS_CONFIG / ROWS_GX_CONFIG); ``gs_dtype``: the dtype of the intermediate gradient gs
    (default GS_DTYPE; None there: x's dtype); ``gw_in_gx`` (tiles only): the weight gradient's partial sums taken by the gx kernel
    (from its shifted reads of gs) instead of the gs kernel (from K*K more reads of x) (default GW_IN_GX)."""
    b, h, w, d, k = _check(x, weight)
    x = _unit_channel_stride(x)
    weight = weight.contiguous()
    gy = gy.contiguous()
    gs = torch.empty(b, h * w, d, device=x.device, dtype=gs_dtype or GS_DTYPE or x.dtype)
    gx = torch.empty(b, h, w, d, device=x.device, dtype=x.dtype)
    if _use_rows(k, algo, out_bdl):
        if gw_in_gx:
            raise ValueError("dwconv row kernels: the weight gradient is summed by the gs kernel (gw_in_gx is for "
                             "the tiles)")
        bd, rows, nw = _rows_config(gs_config or ROWS_GS_CONFIG)
        n_rblk, grid = _rows_grid(b, h, d, bd, rows)
        gw_part = torch.empty(grid[0], d, k * k, device=x.device, dtype=torch.float32)
        _dwconv_bwd_gs_rows_kernel[grid](x, weight, gy, gs, gw_part, h, w, d, n_rblk, x.stride(0), x.stride(1),
                                         x.stride(2), OUT_BDL=bool(out_bdl), ROWS=rows, BLOCK_D=bd, num_warps=nw)
        bd, rows, nw = _rows_config(gx_config or ROWS_GX_CONFIG)
        n_rblk, grid = _rows_grid(b, h, d, bd, rows)
        _dwconv_bwd_gx_rows_kernel[grid](gs, weight, gx, h, w, d, n_rblk, ROWS=rows, BLOCK_D=bd, num_warps=nw)
        return gx, gw_part.sum(0).view(d, 1, k, k).to(weight.dtype)
    in_gx = GW_IN_GX if gw_in_gx is None else bool(gw_in_gx)
    bp, bd, nw = _config(gs_config or GS_CONFIG)
    n_pblk, grid = _grid(b, h, w, d, bp, bd)
    gw_part = None if in_gx else torch.empty(grid[0], d, k * k, device=x.device, dtype=torch.float32)
    _dwconv_bwd_gs_kernel[grid](x, weight, gy, gs, gs if in_gx else gw_part, h, w, d, n_pblk, x.stride(0),
                                x.stride(1), x.stride(2), K=k, OUT_BDL=bool(out_bdl), BLOCK_P=bp, BLOCK_D=bd,
                                WITH_GW=not in_gx, num_warps=nw)
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
def _dwconv_fwd(x: torch.Tensor, weight: torch.Tensor, out_bdl: bool, algo: str) -> torch.Tensor:
    return dwconv_silu_fwd_launch(x, weight, out_bdl, algo=algo)


@_dwconv_fwd.register_fake
def _(x, weight, out_bdl, algo):
    b, h, w, d = x.shape
    return x.new_empty((b, d, h, w) if out_bdl else (b, h, w, d))


@torch.library.custom_op("lamamba::dwconv_silu_bwd", mutates_args=())
def _dwconv_bwd(x: torch.Tensor, weight: torch.Tensor, gy: torch.Tensor, out_bdl: bool,
                algo: str) -> tuple[torch.Tensor, torch.Tensor]:
    return dwconv_silu_bwd_launch(x, weight, gy, out_bdl, algo=algo)


@_dwconv_bwd.register_fake
def _(x, weight, gy, out_bdl, algo):
    return x.new_empty(x.shape), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, out_bdl, algo = inputs
    ctx.save_for_backward(x, weight)
    ctx.out_bdl = out_bdl
    ctx.algo = algo


def _backward(ctx, gy):
    x, weight = ctx.saved_tensors
    gx, gw = _dwconv_bwd(x, weight, gy, ctx.out_bdl, ctx.algo)
    return gx, gw, None, None


_dwconv_fwd.register_autograd(_backward, setup_context=_setup_context)


def dwconv_silu_triton(x: torch.Tensor, weight: torch.Tensor, out_bdl: bool = True,
                       algo: str | None = None) -> torch.Tensor:
    """``silu(depthwise conv(x))`` through the Triton kernels (custom op with autograd): x (B, H, W, D) with any
    strides (a copy only when the channel stride is not 1), weight (D, 1, K, K), K odd; the output in x's dtype,
    (B, D, H, W) when ``out_bdl`` else (B, H, W, D). ``algo``: "auto", "rows" or "tiles" (default ALGO)."""
    algo = algo or ALGO
    if algo not in ALGOS:
        raise ValueError(f"dwconv kernels: unknown algo {algo!r}; choose one of {', '.join(ALGOS)}")
    return _dwconv_fwd(x, weight.to(x.dtype) if weight.dtype != x.dtype else weight, bool(out_bdl), algo)
