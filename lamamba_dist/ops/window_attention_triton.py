"""Window attention in Triton, from the qkv projection's output to the input of the output projection:
``softmax(q k^T * scale + bias) v`` in every window and head, with the additive bias and its gradient.

LaMamba-Diff's window attention (models/lamamba.py ``WindowAttention``, docs/model.md §5) attends within windows of
w x w = 64 tokens at head dims 20, 40 and 80 (LaMamba-XL), with an additive bias per (window, head): Swin's learned
relative-position bias plus, in shifted blocks, the -100 mask between regions. PyTorch's SDPA takes such a bias only
as a (B * nW, h, N, N) ``attn_mask`` broadcast over the batch: its CUDA kernel for a mask that needs a gradient is
the memory-efficient one (sm80 CUTLASS; cuDNN's and flash's have no bias gradient), which reads the broadcast mask
per window in the forward and the backward and writes the bias gradient at the mask's full size, that autograd
then sums over the batch; a head dim of 20 is zero-padded to 24 (copies of q, k and v) for it to run at all.

Here every (window, head) is one program: N tokens (padded to a power of two, at least 16, for ``tl.dot``), the head
dim walked in chunks of 16 (``HEAD_CHUNK``; masked in memory, so 20 costs no copy). The kernels read q, k and v
where the qkv projection wrote them, (B * nW, N, 3, h, e), and write the output as (B * nW, N, h * e), the output
projection's input, so no transposed copy is made on either side. Given the window partition as a token order
(shifted or not), they read the qkv projection of the map's tokens, (B, L, 3C), through it and write the output on
the same tokens: WindowAttention (models/lamamba.py) then applies its qkv and output projections to the map as it
is, and the two gathers of the partition and its reverse, and their backward, are not needed.

Forward, grid (B * nW, h): S = q k^T * scale + bias[window]; with the row max m and l = sum exp(S - m),
P = exp(S - m) / l and O = P v, and the log-sum-exp m + log l per row for the backward (fp32, (B * nW, h, N)).

Backward, grid (nW, h, image chunks), no atomics: a program owns one window position and head and walks
``per`` images of the batch; for each, a first pass over the head dim recomputes S and P = exp(S - lse) and takes
dP = dO V^T and rowsum(dO O), so dS = P (dP - rowsum(dO O)); a second pass (the tiles again, from L1) writes
dV = P^T dO, dQ = dS K * scale and dK = dS^T Q * scale into one (B * nW, N, 3, h, e)
gradient of the qkv projection's output (the layout of its input, so autograd needs no stack of three tensors). The
bias gradient of its window position, the sum of dS over its images, stays in registers and is written once
per program to an fp32 partial buffer that torch sums over the chunks in a fixed order (deterministic).

Numerics: products accumulate in fp32 (``tl.dot``); in fp32 the dots run in IEEE fp32 (no TF32); P and dS are
rounded to the inputs' dtype before their dots, as flash attention does. Within bf16 rounding of the reference,
tests/ops/test_window_attention_triton.py.

Exposed as the custom ops ``lamamba::window_attention_fwd`` / ``lamamba::window_attention_bwd`` (fake kernels and
autograd), so torch.compile traces through them without a graph break, and as :func:`window_attention_triton`.
The dispatch point and the PyTorch paths are lamamba_dist/ops/window_attention.py (``attn_backend = "triton"``).
Importing this module imports triton; under TRITON_INTERPRET=1 (set before the import) the kernels run on CPU
tensors through Triton's interpreter.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Triton's interpreter multiplies bf16 operands of tl.dot as raw integers (Triton 3.8), so under it every dot takes
# the fp32 path (operands widened first); the rounding of P and dS to bf16 before their dots is kept.
_WIDEN_DOTS = os.environ.get("TRITON_INTERPRET") == "1"

# About this many backward programs (window positions x heads x image chunks): each walks ceil(images / chunks)
# images, so the bias gradient's partial buffer stays about BWD_PROGRAMS * N * N fp32 values whatever the batch.
BWD_PROGRAMS = 2048
# Warps a program. Compiled for sm_90 on CPU (Triton 3.8's compiler and ptxas, `cuobjdump -res-usage` on the cubin;
# tests/ops/test_kernels_compile.py compiles them at LaMamba-XL's shapes), the backward's body holds S, dP, dS and
# the bias gradient (N x N fp32 each) beside one chunk of each tile: for LaMamba-XL's head dims 20, 40 and 80 it
# needs 254-255 registers a thread on four warps (120 bytes of spills at 40) and 235-255 on eight, without spills,
# also through a token order; the forward 96 on four (124-128 through a token order). With the whole head dim in
# registers at once (one 64 x 32 / 64 / 128 tile) the backward spilled 200-700 bytes even on eight warps. Not yet
# timed on a GPU: `lamamba bench kernels --what attn --sweep` times four and eight warps and the image chunks.
BWD_WARPS = 8
FWD_WARPS = 4
# The head dim is walked in chunks of this many (tl.dot's least K): LaMamba-XL's 20, 40 and 80 are read as 32, 48
# and 80, with the register tiles of one chunk at a time.
HEAD_CHUNK = 16


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _qk(qb, kb, t, tmask, rows, e, C: tl.constexpr, E: tl.constexpr, EC: tl.constexpr, IEEE: tl.constexpr):
    """q k^T of one (window, head), the head dim walked in chunks of EC (fp32, (BLOCK_N, BLOCK_N))."""
    acc = tl.zeros((t.shape[0], t.shape[0]), dtype=tl.float32)
    for j in tl.static_range(0, E, EC):
        m = tmask[:, None] & (e + j < E)[None, :]
        q = tl.load(qb + j + rows, mask=m, other=0.0)
        k = tl.load(kb + j + rows, mask=m, other=0.0)
        acc += _dot(q, tl.trans(k), IEEE)
    return acc


@triton.jit
def _tokens(order_ptr, win, t, tmask, N: tl.constexpr, HAS_ORDER: tl.constexpr):
    """The rows of window ``win``'s N slots in its image: win * N + t in the windows layout, order[win * N + t] in
    the token layout (the tokens of the map, the window partition read through ``order``)."""
    tok = win * N + t
    if HAS_ORDER:
        tok = tl.load(order_ptr + tok, mask=tmask, other=0)
    return tok.to(tl.int32)


@triton.jit
def _wattn_fwd_kernel(qkv_ptr, bias_ptr, order_ptr, out_ptr, lse_ptr, scale, NW: tl.constexpr, HEADS: tl.constexpr,
                      N: tl.constexpr, E: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr, EC: tl.constexpr,
                      HAS_ORDER: tl.constexpr, IEEE: tl.constexpr):
    bw = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1)
    img, win = bw // NW, bw % NW
    t = tl.arange(0, BLOCK_N)
    e = tl.arange(0, EC)
    tmask = t < N  # (constants: no mask at all where N and E fill their blocks)
    tok = _tokens(order_ptr, win, t, tmask, N, HAS_ORDER)
    rows = tok[:, None] * (3 * C) + e[None, :]
    qb = qkv_ptr + img * (NW * N * 3 * C) + hh * E
    bias = tl.load(bias_ptr + (win * HEADS + hh) * (N * N) + t[:, None] * N + t[None, :],
                   mask=tmask[:, None] & tmask[None, :], other=0.0)
    s = _qk(qb, qb + C, t, tmask, rows, e, C, E, EC, IEEE) * scale + bias.to(tl.float32)
    s = tl.where(tmask[None, :], s, float("-inf"))  # the padded keys
    m = tl.max(s, 1)
    p = tl.exp(s - m[:, None])
    l = tl.sum(p, 1)
    p = p / l[:, None]
    ob = out_ptr + img * (NW * N * C) + hh * E + tok[:, None] * C + e[None, :]
    for j in tl.static_range(0, E, EC):
        m2 = tmask[:, None] & (e + j < E)[None, :]
        v = tl.load(qb + 2 * C + j + rows, mask=m2, other=0.0)
        o = _dot(p.to(v.dtype), v, IEEE)
        tl.store(ob + j, o.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(lse_ptr + (bw * HEADS + hh) * N + t, m + tl.log(l), mask=tmask)


@triton.jit
def _wattn_bwd_kernel(qkv_ptr, bias_ptr, order_ptr, out_ptr, gout_ptr, lse_ptr, gqkv_ptr, gbias_ptr, scale, IMAGES,
                      PER, NW: tl.constexpr, HEADS: tl.constexpr, N: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                      BLOCK_N: tl.constexpr, EC: tl.constexpr, HAS_ORDER: tl.constexpr, IEEE: tl.constexpr):
    win = tl.program_id(0)
    hh = tl.program_id(1)
    chunk = tl.program_id(2)
    t = tl.arange(0, BLOCK_N)
    e = tl.arange(0, EC)
    tmask = t < N
    bmask = tmask[:, None] & tmask[None, :]
    nn = t[:, None] * N + t[None, :]
    tok = _tokens(order_ptr, win, t, tmask, N, HAS_ORDER)
    rows = tok[:, None] * (3 * C) + e[None, :]
    orows = tok[:, None] * C + e[None, :]
    bias_base = bias_ptr + (win * HEADS + hh) * (N * N)
    gty = gqkv_ptr.dtype.element_ty
    gb = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    lo = chunk * PER
    hi = tl.minimum(lo + PER, IMAGES)
    for img in range(lo, hi):
        bw = win.to(tl.int64) + img * NW  # the window's row of lse (img * NW < 2^31)
        qb = qkv_ptr + (bw - win) * (N * 3 * C) + hh * E  # the image's first row
        gqb = gqkv_ptr + (bw - win) * (N * 3 * C) + hh * E
        ob = out_ptr + (bw - win) * (N * C) + hh * E
        gob = gout_ptr + (bw - win) * (N * C) + hh * E
        # first pass over the head dim: S = q k^T, dP = dO v^T and delta = rowsum(dO o)
        s = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
        dp = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
        delta = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in tl.static_range(0, E, EC):
            m2 = tmask[:, None] & (e + j < E)[None, :]
            q = tl.load(qb + j + rows, mask=m2, other=0.0)
            k = tl.load(qb + C + j + rows, mask=m2, other=0.0)
            s += _dot(q, tl.trans(k), IEEE)
            do = tl.load(gob + j + orows, mask=m2, other=0.0)
            v = tl.load(qb + 2 * C + j + rows, mask=m2, other=0.0)
            dp += _dot(do, tl.trans(v), IEEE)
            o = tl.load(ob + j + orows, mask=m2, other=0.0)
            delta += tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(lse_ptr + (bw * HEADS + hh) * N + t, mask=tmask, other=0.0)
        bias = tl.load(bias_base + nn, mask=bmask, other=0.0).to(tl.float32)  # each time (L1): fewer live registers
        s = tl.where(tmask[None, :], s * scale + bias, float("-inf"))
        p = tl.exp(s - lse[:, None])
        ds = p * (dp - delta[:, None])
        gb += ds
        pl = p.to(gty)
        dsl = ds.to(gty)
        # second pass: dV = P^T dO, dQ = dS k * scale, dK = dS^T q * scale, chunk by chunk (the tiles again, from L1)
        for j in tl.static_range(0, E, EC):
            m2 = tmask[:, None] & (e + j < E)[None, :]
            do = tl.load(gob + j + orows, mask=m2, other=0.0)
            tl.store(gqb + 2 * C + j + rows, _dot(tl.trans(pl), do, IEEE).to(gty), mask=m2)
            k = tl.load(qb + C + j + rows, mask=m2, other=0.0)
            tl.store(gqb + j + rows, (_dot(dsl, k, IEEE) * scale).to(gty), mask=m2)
            q = tl.load(qb + j + rows, mask=m2, other=0.0)
            tl.store(gqb + C + j + rows, (_dot(tl.trans(dsl), q, IEEE) * scale).to(gty), mask=m2)
    tl.store(gbias_ptr + ((chunk * NW + win) * HEADS + hh).to(tl.int64) * (N * N) + nn, gb, mask=bmask)


def _block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _check(qkv: torch.Tensor, bias: torch.Tensor, heads: int, order) -> tuple[int, int, int, int, int]:
    """(windows B * nW, tokens a window N, C, window positions nW, head dim e), or a ValueError naming the shapes."""
    nw, n = bias.shape[0], bias.shape[-1]
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"window attention: qkv must be (B * nW, N, 3 * heads * e), or (B, L, 3 * heads * e) with "
                         f"a token order, for {heads} heads, got {tuple(qkv.shape)}")
    rows, length, c3 = qkv.shape
    if order is None and (bias.shape != (nw, heads, length, length) or rows % nw):
        raise ValueError(f"window attention: bias must be (nW, {heads}, {length}, {length}) with nW dividing {rows} "
                         f"windows, got {tuple(bias.shape)}")
    if order is not None and (bias.shape != (nw, heads, n, n) or nw * n != length or order.shape != (length,)):
        raise ValueError(f"window attention: with a token order of shape {tuple(order.shape)}, qkv (B, L, 3C) "
                         f"{tuple(qkv.shape)} and bias {tuple(bias.shape)} must have L = nW * N tokens, bias "
                         f"(nW, {heads}, N, N) and order (L,)")
    bw = rows if order is None else rows * nw
    return bw, n, c3 // 3, nw, c3 // 3 // heads


def window_attention_fwd_launch(qkv: torch.Tensor, bias: torch.Tensor, heads: int, order: torch.Tensor | None = None,
                                fwd_warps: int | None = None):
    """(out in qkv's dtype and layout with C = 3C / 3 channels, lse (B * nW, h, N) fp32) for qkv (B * nW, N, 3C),
    or (B, L, 3C) with ``order`` (L,), the token of each window slot (window w's slot t is token order[w * N + t]),
    and bias (nW, h, N, N). ``fwd_warps``: warps a program (FWD_WARPS by default)."""
    bw, n, c, nw, e = _check(qkv, bias, heads, order)
    qkv, bias = qkv.contiguous(), bias.contiguous()
    out = torch.empty(*qkv.shape[:2], c, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(bw, heads, n, device=qkv.device, dtype=torch.float32)
    bn, ec = _block_n(n), HEAD_CHUNK
    order = None if order is None else order.contiguous()  # any integer dtype: the kernels read it as it is
    _wattn_fwd_kernel[(bw, heads)](qkv, bias, order if order is not None else lse, out, lse, e ** -0.5, NW=nw,
                                   HEADS=heads, N=n, E=e, C=c, BLOCK_N=bn, EC=ec, HAS_ORDER=order is not None,
                                   IEEE=qkv.dtype == torch.float32 or _WIDEN_DOTS,
                                   num_warps=fwd_warps or FWD_WARPS)
    return out, lse


def window_attention_bwd_launch(gout: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
                                lse: torch.Tensor, heads: int, order: torch.Tensor | None = None,
                                programs: int | None = None, bwd_warps: int | None = None):
    """(gradient of qkv in qkv's dtype and layout, gradient of bias in bias's dtype). ``programs``: about how
    many backward programs (BWD_PROGRAMS by default), i.e. how many images each walks; ``bwd_warps``: warps a
    program (BWD_WARPS by default)."""
    bw, n, c, nw, e = _check(qkv, bias, heads, order)
    qkv, bias, out, gout = qkv.contiguous(), bias.contiguous(), out.contiguous(), gout.contiguous()
    images = bw // nw
    per = max(1, -(-images * nw * heads // (programs or BWD_PROGRAMS)))
    chunks = -(-images // per)
    gqkv = torch.empty_like(qkv)
    part = torch.empty(chunks, nw, heads, n, n, device=qkv.device, dtype=torch.float32)
    bn, ec = _block_n(n), HEAD_CHUNK
    order = None if order is None else order.contiguous()  # any integer dtype: the kernels read it as it is
    _wattn_bwd_kernel[(nw, heads, chunks)](qkv, bias, order if order is not None else lse, out, gout, lse, gqkv, part,
                                           e ** -0.5, images, per, NW=nw, HEADS=heads, N=n, E=e, C=c, BLOCK_N=bn,
                                           EC=ec, HAS_ORDER=order is not None,
                                           IEEE=qkv.dtype == torch.float32 or _WIDEN_DOTS,
                                           num_warps=bwd_warps or BWD_WARPS, num_stages=1)
    return gqkv, part.sum(0).to(bias.dtype)


@torch.library.custom_op("lamamba::window_attention_fwd", mutates_args=())
def _window_attention_fwd(qkv: torch.Tensor, bias: torch.Tensor, order: Optional[torch.Tensor],
                          heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    return window_attention_fwd_launch(qkv, bias, heads, order)


@_window_attention_fwd.register_fake
def _(qkv, bias, order, heads):
    bw, n, c, _, _ = _check(qkv, bias, heads, order)
    return qkv.new_empty(*qkv.shape[:2], c), qkv.new_empty(bw, heads, n, dtype=torch.float32)


@torch.library.custom_op("lamamba::window_attention_bwd", mutates_args=())
def _window_attention_bwd(gout: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor, order: Optional[torch.Tensor],
                          out: torch.Tensor, lse: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    return window_attention_bwd_launch(gout, qkv, bias, out, lse, heads, order)


@_window_attention_bwd.register_fake
def _(gout, qkv, bias, order, out, lse, heads):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(
        bias, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, bias, order, heads = inputs
    out, lse = output
    ctx.save_for_backward(qkv, bias, order, out, lse)
    ctx.heads = heads


def _backward(ctx, gout, _glse):  # lse never leaves window_attention_triton
    qkv, bias, order, out, lse = ctx.saved_tensors
    gqkv, gbias = _window_attention_bwd(gout.to(qkv.dtype).contiguous(), qkv, bias, order, out, lse, ctx.heads)
    return gqkv, gbias, None, None


_window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def window_attention_triton(qkv: torch.Tensor, bias: torch.Tensor, heads: int,
                            order: torch.Tensor | None = None) -> torch.Tensor:
    """qkv (B * nW, N, 3 * C), the qkv projection's output on the windows' tokens (q, k, v, then heads, then the
    head dim), bias (nW, h, N, N) additive, window w of image b being row b * nW + w: the attention output
    (B * nW, N, C), heads then head dim, as the output projection reads it. With ``order`` (L = nW * N,) integer,
    qkv is (B, L, 3C) on the map's tokens and window w's slot t is token order[w * N + t] (the window partition,
    shifted or not, as a permutation: lamamba_dist/ops/window_attention.py window_token_order); the output is then
    (B, L, C) on the same tokens. q is scaled by e^-0.5 inside."""
    out, _ = _window_attention_fwd(qkv.contiguous(), bias.contiguous(), order, heads)
    return out
