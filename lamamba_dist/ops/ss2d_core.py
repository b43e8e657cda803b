"""SS2D's scan core with a lean backward: keep the map, not its four snake copies and their deltas.

The core of SS2D, from the activated conv output x (B, D, L), or channels-last (B, L, D) as SS2D passes it, to
the merged scan output, channels-last (B, L, D):

    xs    = cross_scan(x)                       (B, 4, D, L)   the map along the four snake paths
    x_dbl = x_proj_weight @ xs                  (B, 4, R+2N, L)  -> dts_r (B,4,R,L), Bs, Cs (B,4,N,L)
    dts   = dt_projs_weight @ dts_r             (B, 4, D, L)
    ys    = selective_scan(xs, dts, A, Bs, Cs, D, bias)
    y     = cross_merge(ys), transposed         (B, L, D)      what out_norm reads

The merge writes channels-last directly and the backward gathers the channels-last gradient straight into the
four sequences (cross_scan.snake_merge_cl / snake_gather_cl; on CUDA by default, Triton kernels whose reads and
writes are both contiguous runs, so neither pass has a separate transpose of a map). With a channels-last x the
same two kernels gather x into the four sequences and merge their gradient back, and the x projection, which acts
per position, runs on the map: one GEMM (B*L, D) x (D, K(R+2N)) whose small output is read along the paths, and
in the backward one GEMM for its weight gradient (B*L summed inside it) and one that adds its input gradient to
the merged (B, L, D) gradient in its epilogue.

Plain autograd keeps xs and dts for the backward: two (B, 4, D, L) tensors, 8x the map, in every SS2D (about
3.3 GiB each for LaMamba-XL at 256 px, batch 64, in bf16). ``ss2d_core`` is one autograd function that keeps
x, dts_r (R = C/16 rows instead of D = 2C, padded with zero rows to a multiple of 8: RANK_ALIGN), Bs, Cs and
the scan kernel's per-chunk states, and in the backward gathers xs again from x and recomputes dts with the
small (D x R) projection before calling the scan kernel's own backward: the scan itself is never recomputed.
The extra backward work is one gather and one rank-R matmul per SS2D. Run eagerly (the custom ops always are)
with the Triton kernel, the scan writes its output over xs and its du, ddelta over the gathered output gradient
and the recomputed dts, so the backward holds three (B, 4, D, L) tensors at once instead of five
(scan_triton.scan1_fwd_launch / scan1_bwd_launch). With
``core="op"`` and the real kernels the forward and the backward are custom ops
(``lamamba::ss2d_core_fwd`` / ``_bwd``), so that torch.compile keeps this choice: it cannot see inside them to
save xs and dts instead, as it does through the autograd.Function (``core="function"``). "op" is the default
(``core="auto"``): in LaMamba-XL's compiled training step it measured 2.8% faster than the function at 256 px and
within 0.3% at 512 px, with about 4 GiB less peak memory, within 0.1 GiB of DiT-XL/2's (docs/performance.md).

With ``snake="fused"`` (the model setting ``snake_backend``) and the Triton scan, the forward of a map whose
sequences fit one tile (up to 16x16) runs the gather, the scan and the merge as one kernel that reads x along the
paths and writes y channels-last (snake_scan_triton.py); its backward is the one above, the scan starting from a
zero state.

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
try:
    from lamamba_dist.ops import snake_scan_triton as _SNAKE_SCAN
except ImportError:  # no triton: the fused short-sequence kernels are off
    _SNAKE_SCAN = None


def _fused_snake(kernel: str, snake: str, channels_last: bool, length: int, forward: bool = False) -> bool:
    """Whether the core runs the gather, the scan and the merge as one kernel (snake_scan_triton.py) in the
    backward, or with ``forward`` in the forward: ``snake="fused"``, the Triton scan on a channels-last map whose
    sequences are short enough (snake_scan_triton.MAX_LENGTH, FWD_MAX_LENGTH), run eagerly (inside the custom ops)."""
    return (snake == "fused" and _SNAKE_SCAN is not None and kernel == "triton" and channels_last
            and _SNAKE_SCAN.eligible(length, forward=forward) and not torch.compiler.is_compiling())


def _direction_major(kernel: str, fused: bool) -> bool:
    """Whether the deltas run direction-major, (K, D, B*L) seen as (B, K*D, L): eagerly with the Triton scan, whose
    kernels read and write them strided; the fused snake kernels and mamba-ssm's read them contiguous, and traced
    (the function core under torch.compile) the layout is Inductor's."""
    return kernel == "triton" and not fused and not torch.compiler.is_compiling()


def _fused_pair():
    if _SS._cuda_module() is None:
        raise RuntimeError("the fused selective scan needs mamba-ssm built with CUDA (pip install 'lamamba-dist[cuda]')")

    def fwd(u, delta, A, B, C, D, bias, softplus, reuse=False):  # mamba-ssm allocates its own outputs
        return _SS._scan_fwd(u, delta, A, B, C, D, bias, softplus)

    def bwd(u, delta, A, B, C, D, bias, dout, states, softplus, reuse=False):
        return _SS._scan_bwd(u, delta, A, B, C, D, bias, dout, states, softplus)

    return fwd, bwd


def _triton_pair():
    st = _ST
    if st is None:
        raise RuntimeError("the triton selective scan needs triton (it ships with CUDA builds of torch)")

    # ``reuse`` (eagerly only, where the caller owns u, delta and dout and needs none of them after the call):
    # the kernels write y over u, and gu, gdelta over dout, delta (scan1_fwd_launch, scan1_bwd_launch)
    def fwd(u, delta, A, B, C, D, bias, softplus, reuse=False):
        chunk = int(st.default_chunk(u.shape[2]))
        if reuse:
            return st.scan1_fwd_launch(u, delta, A, B, C, D, bias, softplus, chunk, y=u)
        return st._scan1_fwd(u, delta, A, B, C, D, bias, softplus, chunk)

    def bwd(u, delta, A, B, C, D, bias, dout, states, softplus, reuse=False):
        chunk = int(st.default_chunk(u.shape[2]))
        if reuse:
            return st.scan1_bwd_launch(u, delta, A, B, C, D, bias, dout, states, softplus, chunk, gu=dout,
                                       gdelta=delta)
        return st._scan1_bwd(u, delta, A, B, C, D, bias, dout, states, softplus, chunk)

    return fwd, bwd


def _reference_pair():
    """The literal recurrence; its backward re-runs it under autograd (for tests: the real kernels keep states)."""
    selective_scan_reference = _SS.selective_scan_reference

    def fwd(u, delta, A, B, C, D, bias, softplus, reuse=False):
        with torch.no_grad():
            out = selective_scan_reference(u, delta, A, B, C, D, bias, softplus)
        return out, u.new_empty(0, dtype=torch.float32)

    def bwd(u, delta, A, B, C, D, bias, dout, states, softplus, reuse=False):
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(True) for t in (u, delta, A, B, C, D, bias)]
            out = selective_scan_reference(*ins, delta_softplus=softplus)
            return torch.autograd.grad(out, ins, dout)

    return fwd, bwd


KERNELS = {"fused": _fused_pair, "triton": _triton_pair, "reference": _reference_pair}
# How the core reaches autograd (the model setting ``scan_core``): "function" (an autograd.Function, which
# torch.compile traces into the block's graph), "op" (the custom ops below, opaque to torch.compile, so a compiled
# block keeps what the core keeps eagerly) or "auto" (= "op": in LaMamba-XL's compiled training step on one H100,
# 476.8 against 463.6 img/s at 256 px, batch 64, and 4.5 GiB less peak memory; docs/performance.md).
# The "reference" kernel always runs as the function: its backward re-runs the recurrence under autograd.
CORES = ("auto", "function", "op")


def resolve_core(core: str) -> str:
    """"function" or "op": what ``core`` (one of CORES) runs as."""
    if core not in CORES:
        raise ValueError(f"unknown scan core {core!r}; choose one of {', '.join(CORES)}")
    return "op" if core == "auto" else core


# The deltas' rank R is padded with zeros to a multiple of RANK_ALIGN inside the core (dts_r gets zero rows, the
# dt projection's weight zero columns; the gradients of the padding are dropped), so that the dt projection's
# four GEMMs (forward, its recomputation, and the two of its backward) have 16-byte aligned rows in bf16. At
# R = 20 (LaMamba-XL's first stage, C = 320) their rows are 40 bytes apart, and cuBLAS takes its 2-element-aligned
# sm80 kernels: on one H100 the step's 20 such GEMMs (four in each of the stage's five SS2Ds) took 5.4 ms of
# LaMamba-XL's 121.5 ms at 256 px, batch 64 (docs/performance.md). The zeros add nothing to any sum.
RANK_ALIGN = 8


def _padded_rank(r: int) -> int:
    return -(-r // RANK_ALIGN) * RANK_ALIGN


def _pad_rank(wdt: torch.Tensor, rp: int) -> torch.Tensor:
    """The dt projection's weight (K, D, R) with zero columns up to rank rp."""
    return wdt if wdt.shape[2] == rp else torch.nn.functional.pad(wdt, (0, rp - wdt.shape[2]))


def _direction_major_rank(dts_r: torch.Tensor, rp: int) -> torch.Tensor:
    """dts_r (B, K, R, L) copied direction-major, (K, rp, B, L) seen as (B, K, rp, L), rows R.. zero."""
    b, k, r, length = dts_r.shape
    if rp == r:
        return dts_r.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)
    out = dts_r.new_empty(k, rp, b, length)
    out[:, :r].copy_(dts_r.permute(1, 2, 0, 3))
    out[:, r:].zero_()
    return out.permute(2, 0, 1, 3)


def _gather_xs(x, paths, inverse, snake: str, channels_last: bool):
    """The map along the four snake paths, (B, 4, D, L), from x (B, L, D) when channels_last else (B, D, L)."""
    if channels_last:
        return snake_gather_cl(x, paths, inverse, snake)
    return _scan_gather(x, paths)


def _per_direction_matmul(w: torch.Tensor, x: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """w (K, M, N) applied to every batch row of its direction: (B, K, N, L) -> (B, K, M, L); with ``acc``
    (B, K, M, L) the product is added to it: eagerly in place, in the GEMM's epilogue.

    Eagerly (inside the custom ops, and the function outside torch.compile) it is one batched GEMM per
    direction with w[k] expanded over B (batch stride 0: cuBLAS reads the same matrix for every row) writing
    into its slice of the result. torch.matmul's broadcast would copy w once per batch row first, (B, K, M, N),
    more bytes than the activations themselves where D*R outgrows L: at LaMamba-XL's 8x8 stage (D 2560, R 80,
    L 64) the repeated x_proj weight is 107 MB at batch 64, the map (B, K, D, L) 84 MB. Traced (the function
    core under torch.compile) it is torch.matmul, left to Inductor."""
    if torch.compiler.is_compiling():
        # out of place: Inductor fuses the sum into the kernel that reads it next (the merge of the four
        # directions), where a traced baddbmm_ becomes a copy of acc into the GEMM's output and a GEMM with
        # beta = 1 (docs/performance.md, the profiles of scan_core "function" before and after)
        return torch.matmul(w, x) if acc is None else acc + torch.matmul(w, x)
    b, k, _, length = x.shape
    m = w.shape[1]
    out = x.new_empty(b, k, m, length) if acc is None else acc
    for i in range(k):
        wi = w[i].expand(b, *w.shape[1:])
        if acc is None:
            torch.bmm(wi, x[:, i], out=out[:, i])
        else:
            out[:, i].baddbmm_(wi, x[:, i])
    return out


def _direction_major_matmul(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w (K, M, N) applied to each direction of x (B, K, N, L) as one GEMM over B*L per direction: the product
    (K, M, B*L), returned as its (B, K, M, L) view. x is read in place when it is direction-major itself (its
    (K, N, B*L) view exists, as for the forward's dts_r), else copied to that layout first."""
    b, k, nn, length = x.shape
    out = torch.bmm(w, x.permute(1, 2, 0, 3).reshape(k, nn, b * length))
    return out.view(k, w.shape[1], b, length).permute(2, 0, 1, 3)


def _to_sequences(p: torch.Tensor, paths: torch.Tensor, k: int) -> torch.Tensor:
    """A per-position quantity of the map, (B, L, K*M) with direction k's M columns in block k, read along each
    direction's path: (B, K, M, L), [b, k, :, s] = p[b, paths[k, s], k-th block] (a strided view)."""
    b, length, km = p.shape
    m = km // k
    p4 = p.view(b, length, k, m).transpose(1, 2)  # (B, K, L, M)
    return torch.gather(p4, 2, paths.view(1, k, length, 1).expand(b, k, length, m)).transpose(-1, -2)


def _to_grid(g: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The adjoint placement of :func:`_to_sequences`: (B, K, M, L) along the paths -> (B*L, K*M) in grid order,
    [b*L + p, k-th block] = g[b, k, :, inverse[k, p]] (each direction visits each position once)."""
    b, k, m, length = g.shape
    g4 = torch.gather(g.transpose(-1, -2), 2, inverse.view(1, k, length, 1).expand(b, k, length, m))  # (B, K, L, M)
    return g4.transpose(1, 2).reshape(b * length, k * m)


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """acc + a @ w: eagerly in place in the GEMM's epilogue (addmm_); traced, out of place for Inductor to fuse."""
    if torch.compiler.is_compiling():
        return acc + torch.matmul(a, w)
    return acc.addmm_(a, w)


def _core_forward(x, x_proj_weight, dt_projs_weight, A, Ds, dt_bias, paths, inverse, kernel: str, snake: str,
                  channels_last: bool):
    """The forward: (y (B, L, D) channels-last, and what the backward keeps: dts_r (direction-major, its rank
    padded to a multiple of RANK_ALIGN), bs, cs, the scan's states)."""
    b, d, length = (x.shape[0], x.shape[2], x.shape[1]) if channels_last else x.shape
    k, r = dt_projs_weight.shape[0], dt_projs_weight.shape[2]
    rp = _padded_rank(r)
    n = A.shape[1]
    fwd, _ = KERNELS[kernel]()
    dtype = x.dtype
    fused = _fused_snake(kernel, snake, channels_last, length, forward=True)
    xs = None if fused else _gather_xs(x, paths, inverse, snake, channels_last)  # (B, K, D, L)
    if channels_last:  # the projection acts per position: one GEMM on the map, its small output gathered
        x_dbl = _to_sequences(torch.matmul(x, x_proj_weight.to(dtype).reshape(-1, d).t()), paths, k)
    else:
        x_dbl = _per_direction_matmul(x_proj_weight.to(dtype), xs)  # (B, K, R+2N, L)
    dts_r, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
    # dts_r kept direction-major, (K, R, B*L) seen as (B, K, R, L): each direction's deltas are then one GEMM over
    # B*L, here and in the backward (_core_backward), where their gradient's weight gradient is one too
    dts_r = _direction_major_rank(dts_r, rp)
    wdt = _pad_rank(dt_projs_weight.to(dtype), rp)
    if _direction_major(kernel, fused):
        dts = _direction_major_matmul(wdt, dts_r)  # (B, K, D, L) view of (K, D, B*L)
    else:
        dts = _per_direction_matmul(wdt, dts_r)  # (B, K, D, L)
    bs, cs = bs.contiguous(), cs.contiguous()
    if fused:  # x read along the paths and the four outputs summed in the kernel; one tile, so the entry state of
        # the sequences is zero: what the unfused backward reads (the fused one reads none)
        y = _SNAKE_SCAN.snake_scan_fwd(x, dts.view(b, k * d, length), bs, cs, A, Ds, dt_bias, paths, inverse)
        shape = _states_shape(kernel, b, k * d, length, n)
        states = (x.new_empty(shape, dtype=torch.float32) if _fused_snake(kernel, snake, channels_last, length)
                  else x.new_zeros(shape, dtype=torch.float32))
        return y, dts_r, bs, cs, states
    # eagerly the scan writes its output over xs (the Triton kernel; the four snake copies are not needed after it)
    out, states = fwd(xs.view(b, k * d, length), dts.view(b, k * d, length), A, bs, cs, Ds, dt_bias, True,
                      not torch.compiler.is_compiling())
    del xs, dts  # the (B, K, D, L) temporaries go as soon as they are read (out may be xs's memory)
    y = snake_merge_cl(out.view(b, k, d, length), paths, inverse, snake)  # (B, L, D)
    return y, dts_r, bs, cs, states


def _core_backward(gy, x, wx_p, wdt_p, dts_r, bs, cs, A, Ds, dt_bias, states, paths, inverse, kernel: str, snake: str,
                   channels_last: bool):
    """The input and parameter gradients from gy (B, L, D): xs gathered again, dts recomputed from dts_r."""
    b, d, length = (x.shape[0], x.shape[2], x.shape[1]) if channels_last else x.shape
    k, r, rp = wdt_p.shape[0], wdt_p.shape[2], dts_r.shape[2]  # rp: the padded rank of the saved dts_r
    _, bwd = KERNELS[kernel]()
    dtype = x.dtype
    wx, wdt = wx_p.to(dtype), _pad_rank(wdt_p.to(dtype), rp)
    fused = _fused_snake(kernel, snake, channels_last, length)
    # Eagerly with the Triton scan, the deltas are recomputed direction-major, (K, D, B*L) seen as (B, K*D, L), from
    # the saved direction-major dts_r, and the kernel writes their gradient over them in that layout: the
    # projection's weight gradient is then one GEMM over B*L per direction, where from (B, K, D, L) it is B*K GEMMs
    # whose (B, K, D, R) products are summed over B (at LaMamba-XL's 8x8 stage, batch 64, 105 MB written and read
    # again in each SS2D).
    direction_major = _direction_major(kernel, fused)
    if direction_major:
        dts_r_km = dts_r.permute(1, 2, 0, 3).reshape(k, rp, b * length)  # (K, rp, B*L), a view
        dts = _direction_major_matmul(wdt, dts_r)  # recomputed: the rank-R projection
    else:
        dts = _per_direction_matmul(wdt, dts_r)  # recomputed: the rank-R projection
    if fused:  # x and gy read along the paths, du merged in the kernel, ddelta written over dts
        g_x_merged, ddelta, dA, dB, dC, dD, dbias = _SNAKE_SCAN.snake_scan_bwd(
            x, dts.view(b, k * d, length), bs, cs, A, Ds, dt_bias, paths, inverse, gy.to(dtype).contiguous(),
            gdelta=dts.view(b, k * d, length))
    else:
        xs = _gather_xs(x, paths, inverse, snake, channels_last)  # recomputed: one gather
        gout = snake_gather_cl(gy.to(dtype), paths, inverse, snake)  # adjoint of the merge: (B, L, D) -> (B, 4, D, L)
        # eagerly the Triton kernel writes du over gout and ddelta over dts: the backward's (B, K, D, L)
        # temporaries are then xs, dts and gout, not five
        du, ddelta, dA, dB, dC, dD, dbias = bwd(xs.view(b, k * d, length), dts.view(b, k * d, length), A, bs, cs,
                                                Ds, dt_bias, gout.view(b, k * d, length), states, True,
                                                not torch.compiler.is_compiling())
        del gout
        if channels_last:
            del xs  # the x projection's gradients are taken on the map below
    del dts
    if direction_major:  # ddelta in the deltas' layout: (K, D, B*L) without a copy
        ddelta = ddelta.view(b, k, d, length).permute(1, 2, 0, 3).reshape(k, d, b * length).to(dtype)
        g_wdt = torch.bmm(ddelta, dts_r_km.transpose(1, 2))  # (K, D, rp)
        g_dts_r = torch.bmm(wdt.transpose(1, 2), ddelta).view(k, -1, b, length).permute(2, 0, 1, 3)  # (B, K, R, L)
        del dts_r_km
    else:
        ddelta = ddelta.view(b, k, d, length).to(dtype)
        # weight grads as (B, K)-batched matmuls on transposed views, summed over B: no permuted copy of the
        # (B, K, D, L) operands (an einsum over "bk..." would fold B into the reduction by copying them)
        g_wdt = torch.matmul(ddelta, dts_r.transpose(-1, -2)).sum(0)  # (K, D, rp)
        g_dts_r = _per_direction_matmul(wdt.transpose(1, 2), ddelta)  # (B, K, rp, L)
    del ddelta
    # the padding's rows and columns dropped (their gradients are zero and belong to no parameter)
    g_xdbl = torch.cat([g_dts_r[:, :, :r], dB.to(dtype), dC.to(dtype)], dim=2)  # (B, K, R+2N, L)
    g_wdt = g_wdt[..., :r]
    if channels_last:
        # on the map: g_xdbl in grid order (B*L, K*(R+2N)), small, against x (B*L, D): the weight gradient is one
        # GEMM with B*L summed inside it, and wx^T g_xdbl lands on the merged gradient, (B, L, D), in the GEMM's
        # epilogue (a quarter of the bytes of adding it to the four sequences)
        g_grid = _to_grid(g_xdbl, inverse)
        w_all = wx.reshape(-1, d)  # (K*(R+2N), D)
        g_wx = torch.matmul(g_grid.t(), x.reshape(b * length, d)).view(wx.shape)
        if fused:
            g_x = g_x_merged
        else:
            g_x = snake_merge_cl(du.to(dtype).view(b, k, d, length), paths, inverse, snake)
            del du
        g_x = _add_matmul(g_x.view(b * length, d), g_grid, w_all).view(b, length, d)
    else:
        g_wx = torch.matmul(g_xdbl, xs.transpose(-1, -2)).sum(0)  # (K, R+2N, D)
        del xs
        # g_xs = du + wx^T g_xdbl, the sum in the GEMM's epilogue, in place in du (one pass over the (B, K, D, L)
        # map instead of three)
        g_xs = _per_direction_matmul(wx.transpose(1, 2), g_xdbl, acc=du.to(dtype).view(b, k, d, length))
        del du
        g_x = _merge_gather(g_xs, inverse)
    return (g_x, g_wx.to(wx_p.dtype), g_wdt.to(wdt_p.dtype).contiguous(), dA.to(A.dtype), dD.to(Ds.dtype),
            dbias.to(dt_bias.dtype))


class _SS2DCore(torch.autograd.Function):
    """The lean core as an autograd.Function (``core="function"``; always for the "reference" kernel, whose
    backward re-runs the literal recurrence under autograd, which a custom op's implementation cannot)."""

    @staticmethod
    def forward(ctx, x, x_proj_weight, dt_projs_weight, A, Ds, dt_bias, paths, inverse, kernel: str, snake: str,
                channels_last: bool):
        y, dts_r, bs, cs, states = _core_forward(x, x_proj_weight, dt_projs_weight, A, Ds, dt_bias, paths, inverse,
                                                 kernel, snake, channels_last)
        ctx.save_for_backward(x, x_proj_weight, dt_projs_weight, dts_r, bs, cs, A, Ds, dt_bias, states, paths, inverse)
        ctx.kernel, ctx.snake, ctx.channels_last = kernel, snake, channels_last
        return y

    @staticmethod
    def backward(ctx, gy):
        grads = _core_backward(gy, *ctx.saved_tensors, ctx.kernel, ctx.snake, ctx.channels_last)
        return (*grads, None, None, None, None, None)


# The lean core of the real kernels ("fused", "triton") as custom ops (``scan_core = "op"``): opaque to
# torch.compile, so the compiled graph keeps exactly what setup_context saves. Traced through the autograd.Function
# instead, AOT autograd sees the backward's gather of xs and its recomputed dts as the forward's own and the
# partitioner saves them, with a transposed copy of xs besides: three (B, 4, D, L) tensors per SS2D, about 9 GiB
# for LaMamba-XL at 256 px, batch 64, counted from the traced graphs (tests/ops/test_ss2d_core.py checks what a
# compiled SS2D saves with each).
@torch.library.custom_op("lamamba::ss2d_core_fwd", mutates_args=())
def _ss2d_core_fwd(x: torch.Tensor, x_proj_weight: torch.Tensor, dt_projs_weight: torch.Tensor, A: torch.Tensor,
                   Ds: torch.Tensor, dt_bias: torch.Tensor, paths: torch.Tensor, inverse: torch.Tensor, kernel: str,
                   snake: str, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    y, dts_r, bs, cs, states = _core_forward(x, x_proj_weight, dt_projs_weight, A, Ds, dt_bias, paths, inverse,
                                             kernel, snake, channels_last)
    return y, dts_r, bs, cs, states  # an op's outputs have the strides of its fake ones (dts_r: direction-major)


def _states_shape(kernel: str, b: int, dim: int, length: int, n: int) -> tuple[int, ...]:
    """The shape of the per-chunk states each kernel's forward returns (what its backward reads)."""
    if kernel == "triton":
        chunk = int(_ST.default_chunk(length))
        return (b, dim, (length + chunk - 1) // chunk)
    if kernel == "fused":
        return (b, dim, _SS._n_chunks(length), 2 * n)
    return (0,)


@_ss2d_core_fwd.register_fake
def _(x, x_proj_weight, dt_projs_weight, A, Ds, dt_bias, paths, inverse, kernel, snake, channels_last):
    b, d, length = (x.shape[0], x.shape[2], x.shape[1]) if channels_last else x.shape
    k, rp = dt_projs_weight.shape[0], _padded_rank(dt_projs_weight.shape[2])
    n = A.shape[1]
    return (x.new_empty(b, length, d), x.new_empty(k, rp, b, length).permute(2, 0, 1, 3), x.new_empty(b, k, n, length),
            x.new_empty(b, k, n, length), x.new_empty(_states_shape(kernel, b, k * d, length, n), dtype=torch.float32))


@torch.library.custom_op("lamamba::ss2d_core_bwd", mutates_args=())
def _ss2d_core_bwd(gy: torch.Tensor, x: torch.Tensor, x_proj_weight: torch.Tensor, dt_projs_weight: torch.Tensor,
                   dts_r: torch.Tensor, bs: torch.Tensor, cs: torch.Tensor, A: torch.Tensor, Ds: torch.Tensor,
                   dt_bias: torch.Tensor, states: torch.Tensor, paths: torch.Tensor, inverse: torch.Tensor,
                   kernel: str, snake: str, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, torch.Tensor, torch.Tensor]:
    return _core_backward(gy, x, x_proj_weight, dt_projs_weight, dts_r, bs, cs, A, Ds, dt_bias, states, paths,
                          inverse, kernel, snake, channels_last)


@_ss2d_core_bwd.register_fake
def _(gy, x, x_proj_weight, dt_projs_weight, dts_r, bs, cs, A, Ds, dt_bias, states, paths, inverse, kernel, snake,
      channels_last):
    return (torch.empty_like(x), torch.empty_like(x_proj_weight), torch.empty_like(dt_projs_weight),
            torch.empty_like(A), torch.empty_like(Ds), torch.empty_like(dt_bias))


def _core_setup_context(ctx, inputs, output):
    x, wx, wdt, A, Ds, dt_bias, paths, inverse, kernel, snake, channels_last = inputs
    _, dts_r, bs, cs, states = output
    ctx.save_for_backward(x, wx, wdt, dts_r, bs, cs, A, Ds, dt_bias, states, paths, inverse)
    ctx.kernel, ctx.snake, ctx.channels_last = kernel, snake, channels_last


def _core_autograd(ctx, gy, *_unused):  # grads of dts_r, bs, cs, states: those never leave ss2d_core
    grads = _ss2d_core_bwd(gy.contiguous(), *ctx.saved_tensors, ctx.kernel, ctx.snake, ctx.channels_last)
    return (*grads, None, None, None, None, None)


_ss2d_core_fwd.register_autograd(_core_autograd, setup_context=_core_setup_context)


def ss2d_core(x: torch.Tensor, x_proj_weight: torch.Tensor, dt_projs_weight: torch.Tensor, A: torch.Tensor,
              Ds: torch.Tensor, dt_bias: torch.Tensor, paths: torch.Tensor, inverse: torch.Tensor,
              kernel: str, snake: str = "auto", channels_last: bool = False, core: str = "auto") -> torch.Tensor:
    """x (B, D, L), or (B, L, D) when ``channels_last``, -> y (B, L, D) channels-last, see the module docstring.
    x_proj_weight (K, R+2N, D), dt_projs_weight (K, D, R), A (K*D, N) fp32, Ds and dt_bias (K*D,) fp32,
    paths/inverse (K, L) from snake_tables; kernel one of KERNELS; snake one of cross_scan.SNAKE_BACKENDS (the
    merge and its adjoint; with ``channels_last`` also the gather of x into the four sequences and its adjoint, so
    x's gradient comes back channels-last too); core one of CORES. Softplus on the deltas, as SS2D uses it."""
    if kernel not in KERNELS:
        raise ValueError(f"ss2d_core kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if snake not in SNAKE_BACKENDS:
        raise ValueError(f"ss2d_core snake backend must be one of {', '.join(SNAKE_BACKENDS)}, got {snake!r}")
    core = resolve_core(core)
    args = (x.contiguous(), x_proj_weight, dt_projs_weight, A.float().contiguous(), Ds.float().contiguous(),
            dt_bias.float().contiguous(), paths, inverse, kernel, snake, bool(channels_last))
    if kernel == "reference" or core != "op":
        return _SS2DCore.apply(*args)
    return _ss2d_core_fwd(*args)[0]
