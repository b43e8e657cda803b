"""SS2D's scan core with a lean backward: keep the map, not its four snake copies and their deltas.

The core of SS2D, from the activated conv output x (B, D, L) to the merged scan output, channels-last (B, L, D):

    xs    = cross_scan(x)                       (B, 4, D, L)   the map along the four snake paths
    x_dbl = x_proj_weight @ xs                  (B, 4, R+2N, L)  -> dts_r (B,4,R,L), Bs, Cs (B,4,N,L)
    dts   = dt_projs_weight @ dts_r             (B, 4, D, L)
    ys    = selective_scan(xs, dts, A, Bs, Cs, D, bias)
    y     = cross_merge(ys), transposed         (B, L, D)      what out_norm reads

The merge writes channels-last directly and the backward gathers the channels-last gradient straight into the
four sequences (cross_scan.snake_merge_cl / snake_gather_cl; on CUDA by default, Triton kernels whose reads and
writes are both contiguous runs, so neither pass has a separate transpose of a map).

Plain autograd keeps xs and dts for the backward: two (B, 4, D, L) tensors, 8x the map, in every SS2D (about
3.3 GiB each for LaMamba-XL at 256 px, batch 64, in bf16). ``ss2d_core`` is one autograd function that keeps
x, dts_r (R = C/16 rows instead of D = 2C), Bs, Cs and the scan kernel's per-chunk states, and in the backward
gathers xs again from x and recomputes dts with the small (D x R) projection before calling the scan kernel's
own backward: the scan itself is never recomputed. The extra backward work is one gather and one rank-R
matmul per SS2D.

It needs a scan with separate forward/backward kernels that returns states: mamba-ssm's (``fused``) or our
Triton d_state-1 kernel (``triton``); ``reference`` pairs the literal recurrence with autograd (CPU tests).
"""

from __future__ import annotations

import importlib

import torch

from lamamba_dist.ops.cross_scan import SNAKE_BACKENDS, _merge_gather, _scan_gather, snake_gather_cl, snake_merge_cl

# The scan modules are resolved here, at import, never inside the functions below: those run while
# torch.compile traces the model, and Dynamo refuses an import (``importlib.import_module``) in a traced
# function (with ``fullgraph=True`` it is an error). ``lamamba_dist.ops`` exports a *function* named
# selective_scan, so the module is fetched by its full name.
_SS = importlib.import_module("lamamba_dist.ops.selective_scan")
_ST = _SS._SCAN_TRITON  # scan_triton, or None where triton does not import


def _fused_pair():
    if _SS._cuda_module() is None:
        raise RuntimeError("the fused selective scan needs mamba-ssm built with CUDA (pip install 'lamamba-dist[cuda]')")

    def fwd(u, delta, A, B, C, D, bias, softplus):
        return _SS._scan_fwd(u, delta, A, B, C, D, bias, softplus)

    def bwd(u, delta, A, B, C, D, bias, dout, states, softplus):
        return _SS._scan_bwd(u, delta, A, B, C, D, bias, dout, states, softplus)

    return fwd, bwd


def _triton_pair():
    st = _ST
    if st is None:
        raise RuntimeError("the triton selective scan needs triton (it ships with CUDA builds of torch)")

    def fwd(u, delta, A, B, C, D, bias, softplus):
        return st._scan1_fwd(u, delta, A, B, C, D, bias, softplus, int(st.default_chunk(u.shape[2])))

    def bwd(u, delta, A, B, C, D, bias, dout, states, softplus):
        return st._scan1_bwd(u, delta, A, B, C, D, bias, dout, states, softplus, int(st.default_chunk(u.shape[2])))

    return fwd, bwd


def _reference_pair():
    """The literal recurrence; its backward re-runs it under autograd (for tests: the real kernels keep states)."""
    selective_scan_reference = _SS.selective_scan_reference

    def fwd(u, delta, A, B, C, D, bias, softplus):
        with torch.no_grad():
            out = selective_scan_reference(u, delta, A, B, C, D, bias, softplus)
        return out, u.new_empty(0, dtype=torch.float32)

    def bwd(u, delta, A, B, C, D, bias, dout, states, softplus):
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(True) for t in (u, delta, A, B, C, D, bias)]
            out = selective_scan_reference(*ins, delta_softplus=softplus)
            return torch.autograd.grad(out, ins, dout)

    return fwd, bwd


KERNELS = {"fused": _fused_pair, "triton": _triton_pair, "reference": _reference_pair}


class _SS2DCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_proj_weight, dt_projs_weight, A, Ds, dt_bias, paths, inverse, kernel: str, snake: str):
        b, d, length = x.shape
        k, r = dt_projs_weight.shape[0], dt_projs_weight.shape[2]
        n = A.shape[1]
        fwd, _ = KERNELS[kernel]()
        dtype = x.dtype
        xs = _scan_gather(x, paths)  # (B, K, D, L)
        x_dbl = torch.matmul(x_proj_weight.to(dtype), xs)  # (B, K, R+2N, L)
        dts_r, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.matmul(dt_projs_weight.to(dtype), dts_r)  # (B, K, D, L)
        bs, cs = bs.contiguous(), cs.contiguous()
        out, states = fwd(xs.view(b, k * d, length), dts.view(b, k * d, length), A, bs, cs, Ds, dt_bias, True)
        ctx.save_for_backward(x, x_proj_weight, dt_projs_weight, dts_r, bs, cs, A, Ds, dt_bias, states, paths, inverse)
        ctx.kernel, ctx.snake = kernel, snake
        return snake_merge_cl(out.view(b, k, d, length), paths, inverse, snake)  # (B, L, D)

    @staticmethod
    def backward(ctx, gy):
        x, wx_p, wdt_p, dts_r, bs, cs, A, Ds, dt_bias, states, paths, inverse = ctx.saved_tensors
        b, d, length = x.shape
        k = wdt_p.shape[0]
        _, bwd = KERNELS[ctx.kernel]()
        dtype = x.dtype
        wx, wdt = wx_p.to(dtype), wdt_p.to(dtype)
        xs = _scan_gather(x, paths)  # recomputed: one gather
        dts = torch.matmul(wdt, dts_r)  # recomputed: the rank-R projection
        gout = snake_gather_cl(gy.to(dtype), paths, inverse, ctx.snake)  # adjoint of the merge: (B, L, D) -> (B, 4, D, L)
        du, ddelta, dA, dB, dC, dD, dbias = bwd(xs.view(b, k * d, length), dts.view(b, k * d, length), A, bs, cs,
                                                Ds, dt_bias, gout.view(b, k * d, length), states, True)
        ddelta = ddelta.view(b, k, d, length).to(dtype)
        # weight grads as (B, K)-batched matmuls on transposed views, summed over B: no permuted copy of the
        # (B, K, D, L) operands (an einsum over "bk..." would fold B into the reduction by copying them)
        g_wdt = torch.matmul(ddelta, dts_r.transpose(-1, -2)).sum(0)  # (K, D, R)
        g_dts_r = torch.matmul(wdt.transpose(1, 2), ddelta)  # (B, K, R, L)
        g_xdbl = torch.cat([g_dts_r, dB.to(dtype), dC.to(dtype)], dim=2)  # (B, K, R+2N, L)
        g_wx = torch.matmul(g_xdbl, xs.transpose(-1, -2)).sum(0)  # (K, R+2N, D)
        g_xs = du.view(b, k, d, length).to(dtype) + torch.matmul(wx.transpose(1, 2), g_xdbl)
        g_x = _merge_gather(g_xs, inverse)
        return (g_x, g_wx.to(wx_p.dtype), g_wdt.to(wdt_p.dtype), dA.to(A.dtype), dD.to(Ds.dtype),
                dbias.to(dt_bias.dtype), None, None, None, None)


def ss2d_core(x: torch.Tensor, x_proj_weight: torch.Tensor, dt_projs_weight: torch.Tensor, A: torch.Tensor,
              Ds: torch.Tensor, dt_bias: torch.Tensor, paths: torch.Tensor, inverse: torch.Tensor,
              kernel: str, snake: str = "auto") -> torch.Tensor:
    """x (B, D, L) -> y (B, L, D) channels-last, see the module docstring. x_proj_weight (K, R+2N, D), dt_projs_weight
    (K, D, R), A (K*D, N) fp32, Ds and dt_bias (K*D,) fp32, paths/inverse (K, L) from snake_tables; kernel one
    of KERNELS; snake one of cross_scan.SNAKE_BACKENDS (the merge and its adjoint). Softplus on the deltas, as
    SS2D uses it."""
    if kernel not in KERNELS:
        raise ValueError(f"ss2d_core kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if snake not in SNAKE_BACKENDS:
        raise ValueError(f"ss2d_core snake backend must be one of {', '.join(SNAKE_BACKENDS)}, got {snake!r}")
    return _SS2DCore.apply(x.contiguous(), x_proj_weight, dt_projs_weight, A.float().contiguous(),
                           Ds.float().contiguous(), dt_bias.float().contiguous(), paths, inverse, kernel, snake)
