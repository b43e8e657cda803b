"""``lamamba bench kernels``: the selective-scan kernels of LaMamba-Diff's SS2D, timed on one GPU (JSON out).

``--what scan`` (the default): the d_state-1 selective scan, mamba-ssm's ``selective_scan_cuda`` (the "fused"
backend, when it imports) against the Triton kernels (lamamba_dist/ops/scan_triton.py), forward and forward+backward,
bf16, at the shapes of LaMamba-XL's SS2D (4 directions, dim = 4 * d_inner; docs/model.md), by stage width::

    256 px, batch 64:  64 x 2560 x L 1024 (32x32 map),  64 x 5120 x L 256 (16x16),  64 x 10240 x L 64 (8x8)
    512 px, batch 16:  16 x 2560 x L 4096 (64x64),      16 x 5120 x L 1024 (32x32), 16 x 10240 x L 256 (16x16)

(the 1280-wide stages at the smallest map hold 12 of LaMamba-XL's 22 blocks)

with the bandwidth the Triton kernels reach, counting the bytes they must move (forward: u and delta read, y written,
6 bytes an element in bf16; backward: u, delta, dy read, du and ddelta written, 10 bytes), and the largest relative
difference of the two backends (output and 7 gradients). ``--sweep`` adds the launch configurations of the Triton
kernels.

``--what ss2d``: SS2D's sequence-scan path (cross_scan of the (B, D, H, W) map, the scan over (B, 4D, L), cross_merge,
the transpose to channels-last) against the gathered scan (lamamba_dist/ops/ss2d_triton.py: channels-last x, no
cross_scan or cross_merge), forward and forward+backward, bf16, and then whole SS2D modules (bf16 autocast) per scan
backend, at LaMamba-XL's shapes (batch x d_inner x map side): 64x640x32, 64x1280x16, 64x2560x8 (256 px) and
16x640x64, 16x1280x32, 16x2560x16 (512 px). ``--sweep`` adds the launch configurations of the gathered kernels.

``--what conv``: SS2D's depthwise 3x3 conv + SiLU (lamamba_dist/ops/dwconv.py), PyTorch's path against the Triton
kernel, at the same shapes as ``ss2d``. ``--sweep`` adds the Triton kernels' launch configurations (a whole backward
per configuration of one of its two kernels), the backward with an fp32 intermediate gradient (the default is the
input's dtype) and with the weight gradient taken in the gx kernel.

``--what snake``: the two layout changes at the ends of SS2D's scan core (lamamba_dist/ops/ss2d_core.py): the
channels-last map (B, L, D) gathered into the four snake sequences (B, 4, D, L), and the four sequences summed back
channels-last; torch's gather + transpose (eager, and compiled as the training step compiles it) against the Triton
kernels (lamamba_dist/ops/cross_scan_triton.py), bf16, at the same shapes as ``ss2d``, with the bandwidth reached
(bytes that must move: 10 per map element, 2 read or written on the map side and 8 on the sequences' side).
``--sweep`` adds the kernels' launch configurations.

``--what core``: SS2D's whole scan core as the model runs it by default (lamamba_dist/ops/ss2d_core.py: the custom
ops, channels-last, the Triton scan and snake kernels; the gather, the x and dt projections, the scan, the merge),
forward and forward+backward, bf16, at the same shapes as ``ss2d`` with the model's rank R = d_inner / 32, with the
rank padded to a multiple of 8 (``RANK_ALIGN``, the default) and unpadded: the A/B of the dt projection's GEMMs'
alignment (R = 20 at the first stage).

``--what attn``: window attention with its additive bias (lamamba_dist/ops/window_attention.py) from the qkv
projection's output (B * nW, 64, 3C) to the output projection's input, PyTorch's SDPA against the Triton kernels
(lamamba_dist/ops/window_attention_triton.py), forward and forward+backward (the gradients of qkv and of the
(nW, h, 64, 64) bias), bf16, 16 heads and windows of 8 x 8 as LaMamba-XL's blocks (batch x C x map side): 64x320x32,
64x640x16, 64x1280x8 (256 px) and 16x320x64, 16x640x32, 16x1280x16 (512 px). ``--sweep`` adds the kernels' warps
and the backward's image chunks.

Times are the median of ``triton.testing.do_bench``. ``--device cpu`` is a smoke run of the same code under Triton's
interpreter (TRITON_INTERPRET=1 set before the start, tiny shapes; its times mean nothing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

from lamamba_dist.bench.common import environment, write_json

GROUPS = 4
SCAN_SHAPES = [(64, 2560, 1024), (64, 5120, 256), (64, 10240, 64),  # batch, dim, L: 256 px, batch 64
               (16, 2560, 4096), (16, 5120, 1024), (16, 10240, 256)]  # 512 px, batch 16
SS2D_SHAPES = [(64, 640, 32), (64, 1280, 16), (64, 2560, 8),  # batch, d_inner, map side
               (16, 640, 64), (16, 1280, 32), (16, 2560, 16)]
ATTN_SHAPES = [(64, 320, 32), (64, 640, 16), (64, 1280, 8),  # batch, C, map side
               (16, 320, 64), (16, 640, 32), (16, 1280, 16)]
ATTN_HEADS, ATTN_WINDOW = 16, 8


def _timer(device: str, reps: int):
    """A function timing ``fn`` in ms: do_bench's median on CUDA, the mean of ``reps`` calls elsewhere."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50)

    def timed(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3

    return timed


def _rel_diff(xs, ys) -> float:
    """The largest difference between paired tensors, relative to the largest magnitude of the second."""
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()
               for a, b in zip(xs, ys))


def sweep_row(rows: list, timer, kernel: str, shape, launch, config) -> None:
    """Time one launch configuration into ``rows`` (an out-of-resources failure becomes a row that says so) and
    print it at once: a sweep cut short keeps what it measured."""
    row = {"kernel": kernel, "shape": list(shape), "config": config}
    try:
        row["ms"] = timer(launch)
    except Exception as e:  # noqa: BLE001 - out of resources, say
        row["error"] = type(e).__name__
    rows.append(row)
    print("# sweep", json.dumps(row), flush=True)


def time_fwd_bwd(timer, fn, args, gy) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ``fn(*args)`` with output gradient ``gy``."""
    import torch

    leaves = [a.detach().requires_grad_() for a in args]
    with torch.no_grad():
        fwd = timer(lambda: fn(*args))

    def fwd_bwd():
        torch.autograd.grad(fn(*leaves), leaves, gy)

    return fwd, timer(fwd_bwd)


# ----------------------------------------------------------------------------- the sequence scan


def scan_inputs(batch, dim, length, device, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s, scale=1.0: torch.randn(*s, generator=g, device=device) * scale  # noqa: E731
    bf = torch.bfloat16
    return [mk(batch, dim, length).to(bf), mk(batch, dim, length, scale=0.5).to(bf), -torch.exp(mk(dim, 1, scale=0.5)),
            mk(batch, GROUPS, 1, length).to(bf), mk(batch, GROUPS, 1, length).to(bf), mk(dim), mk(dim, scale=0.5) - 2.0]


def bench_scan(shapes, device: str, timer, sweep: bool) -> list[dict]:
    import torch

    from lamamba_dist.ops import scan_triton as st
    from lamamba_dist.ops.selective_scan import _cuda_module, selective_scan_fused

    have_mamba = device == "cuda" and _cuda_module() is not None
    rows = []
    for batch, dim, length in shapes:
        args = scan_inputs(batch, dim, length, device)
        gy = torch.randn(batch, dim, length, device=device, dtype=torch.bfloat16)
        elems = batch * dim * length
        backends = [("triton", st.selective_scan_triton)] + ([("fused", selective_scan_fused)] if have_mamba else [])
        for name, scan in backends:
            fwd, fb = time_fwd_bwd(timer, scan, args, gy)
            bwd = max(fb - fwd, 1e-9)
            rows.append({"kernel": "selective_scan", "shape": [batch, dim, length], "backend": name, "fwd_ms": fwd,
                         "fwd_bwd_ms": fb, "bwd_ms": bwd, "fwd_gb_per_s": 6 * elems / fwd / 1e6,
                         "bwd_gb_per_s": 10 * elems / bwd / 1e6})
        if have_mamba:  # the two backends compute the same function
            res = []
            for scan in (st.selective_scan_triton, selective_scan_fused):
                leaves = [a.detach().requires_grad_() for a in args]
                out = scan(*leaves)
                res.append([out, *torch.autograd.grad(out, leaves, gy)])
            rows[-1]["max_rel_diff_to_triton"] = _rel_diff(res[1], res[0])
        if sweep:
            rows += scan_sweep(args, gy, timer)
        del args, gy
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def scan_sweep(args, gy, timer) -> list[dict]:
    import triton

    from lamamba_dist.ops import scan_triton as st

    u, delta, A, B, C, D, bias = args
    batch, dim, length = u.shape
    rep, chunk = dim // GROUPS, st.default_chunk(length)
    n_chunks = triton.cdiv(length, chunk)
    _, states = st.scan1_fwd_launch(u, delta, A, B, C, D, bias, True, chunk)
    rows = []

    def add(kind, launch, config):  # the row records the launch as resolved (the tables fill what it leaves out)
        cfg = {k: config[k] for k in ("sub_d", "nsub", "num_warps", "stages") if k in config}
        resolved = (st._fwd_config if kind == "fwd" else st._bwd_config)(rep, chunk, n_chunks, **cfg)
        config = {**dict(zip(("sub_d", "nsub", "num_warps", "stages"), resolved)), "chunk": chunk}
        sweep_row(rows, timer, f"selective_scan_{kind}_launch", (batch, dim, length), launch, config)

    def per_thread(tile, nw):  # elements of a tile per thread: 4 to 32 keeps the tile in registers
        return 4 <= tile // (32 * nw) <= 32

    for sub_d, nw in itertools.product([1, 2, 4, 8, 16, 32, 64], [1, 2, 4, 8]):
        if rep % sub_d == 0 and 256 <= sub_d * chunk <= 8192 and per_thread(sub_d * chunk, nw):
            add("fwd", lambda: st.scan1_fwd_launch(u, delta, A, B, C, D, bias, True, chunk, sub_d=sub_d, num_warps=nw),
                {"sub_d": sub_d, "num_warps": nw, "chunk": chunk})
    for sub_d, dblk, nw in itertools.product([1, 2, 4, 8, 16], [16, 64], [1, 2, 4, 8]):
        nsub = 1 if n_chunks > 1 else max(dblk // sub_d, 1)
        if (rep % (sub_d * nsub) or not 256 <= sub_d * chunk <= 16384 or (n_chunks > 1 and dblk > 16)
                or not per_thread(sub_d * chunk, nw)):
            continue
        add("bwd", lambda: st.scan1_bwd_launch(u, delta, A, B, C, D, bias, gy, states, True, chunk, sub_d=sub_d,
                                               nsub=nsub, num_warps=nw),
            {"sub_d": sub_d, "nsub": nsub, "num_warps": nw, "chunk": chunk})
    if n_chunks == 1:  # the loops over a program's sub-blocks, software-pipelined, around the default tiles
        sub_d, nsub0, nw, _ = st._bwd_config(rep, chunk, n_chunks)
        for mult, stages in itertools.product([1, 2, 4], [1, 2, 3]):
            nsub = nsub0 * mult
            if rep % (sub_d * nsub) == 0:
                add("bwd", lambda: st.scan1_bwd_launch(u, delta, A, B, C, D, bias, gy, states, True, chunk,
                                                       sub_d=sub_d, nsub=nsub, num_warps=nw, stages=stages),
                    {"sub_d": sub_d, "nsub": nsub, "num_warps": nw, "chunk": chunk, "stages": stages})
        sub_d, _, nw, _ = st._fwd_config(rep, chunk, n_chunks)
        for nsub, stages in itertools.product([2, 4, 8], [1, 2, 3]):
            if rep % (sub_d * nsub) == 0:
                add("fwd", lambda: st.scan1_fwd_launch(u, delta, A, B, C, D, bias, True, chunk, sub_d=sub_d,
                                                       num_warps=nw, nsub=nsub, stages=stages),
                    {"sub_d": sub_d, "nsub": nsub, "num_warps": nw, "chunk": chunk, "stages": stages})
    return rows


# ----------------------------------------------------------------------------- SS2D: sequence path vs gathered scan


def ss2d_inputs(batch, dim, n, device, seed=0):
    """Grid-layout inputs of ss2d_scan: x (B, L, D), delta (B, L, 4, D), B/C (B, L, 4), A (4D, 1), D, bias (4D,)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *s, scale=1.0: torch.randn(*s, generator=g, device=device) * scale  # noqa: E731
    bf, length = torch.bfloat16, n * n
    return [mk(batch, length, dim).to(bf), mk(batch, length, GROUPS, dim, scale=0.5).to(bf),
            mk(batch, length, GROUPS).to(bf), mk(batch, length, GROUPS).to(bf),
            -torch.exp(mk(GROUPS * dim, 1, scale=0.5)), mk(GROUPS * dim), mk(GROUPS * dim, scale=0.5) - 2.0]


def sequence_layout(args, n, tables):
    """The same numbers in the sequence path's layout: x (B, D, n, n), delta (B, 4D, L), B/C (B, 4, 1, L)."""
    import torch

    x, delta, B, C, A, D, bias = args
    paths = tables[0]
    batch, length, dim = x.shape
    x_map = x.transpose(1, 2).reshape(batch, dim, n, n).contiguous()
    ds = torch.stack([delta[:, paths[k], k].transpose(1, 2) for k in range(GROUPS)], 1)
    bs = torch.stack([B[:, paths[k], k] for k in range(GROUPS)], 1).unsqueeze(2).contiguous()
    cs = torch.stack([C[:, paths[k], k] for k in range(GROUPS)], 1).unsqueeze(2).contiguous()
    return [x_map, ds.reshape(batch, GROUPS * dim, length).contiguous(), bs, cs, A, D, bias]


def sequence_ss2d_scan(scan, n, tables):
    """cross_scan -> sequence scan over (B, 4D, L) -> cross_merge -> channels-last (B, L, D), as SS2D does it."""
    from lamamba_dist.ops.cross_scan import cross_merge, cross_scan

    def run(x_map, delta, B, C, A, D, bias):
        batch, dim = x_map.shape[:2]
        ys = scan(cross_scan(x_map, tables).view(batch, GROUPS * dim, n * n), delta, A, B, C, D, bias)
        return cross_merge(ys.view(batch, GROUPS, dim, n * n), n, tables).transpose(1, 2).contiguous()

    return run


def bench_ss2d(shapes, device: str, timer, sweep: bool) -> list[dict]:
    import torch

    from lamamba_dist.models.lamamba import SS2D
    from lamamba_dist.ops import scan_triton as st
    from lamamba_dist.ops import ss2d_triton as sst
    from lamamba_dist.ops.cross_scan import snake_tables
    from lamamba_dist.ops.selective_scan import _cuda_module, selective_scan_fused

    have_mamba = device == "cuda" and _cuda_module() is not None
    rows = []
    for batch, dim, n in shapes:
        tables = snake_tables(n, device)
        args = ss2d_inputs(batch, dim, n, device)
        seq_args = sequence_layout(args, n, tables)
        gy = torch.randn(batch, n * n, dim, device=device, dtype=torch.bfloat16)
        paths = [("sequence+triton", sequence_ss2d_scan(st.selective_scan_triton, n, tables), seq_args)]
        if have_mamba:
            paths.insert(0, ("sequence+fused", sequence_ss2d_scan(selective_scan_fused, n, tables), seq_args))
        gathered = lambda *a: sst.ss2d_scan(*a, tables[0], tables[1])  # noqa: E731
        paths.append(("gathered", gathered, args))
        base = None
        for name, fn, a in paths:
            fwd, fb = time_fwd_bwd(timer, fn, a, gy)
            base = base or fb
            rows.append({"kernel": "ss2d_scan", "shape": [batch, dim, n], "path": name, "fwd_ms": fwd,
                         "fwd_bwd_ms": fb, "speedup_to_first": base / fb})
        # the two layouts compute the same function: the output and the gradients they share
        res = []
        for fn, a in ((paths[-2][1], seq_args), (gathered, args)):
            leaves = [t.detach().requires_grad_() for t in a]
            out = fn(*leaves)
            gx, gA, gD, gbias = torch.autograd.grad(out, [leaves[0], leaves[4], leaves[5], leaves[6]], gy)
            res.append([out, gx.reshape(batch, dim, n * n).transpose(1, 2) if gx.dim() == 4 else gx, gA, gD, gbias])
        rows[-1]["max_rel_diff_to_sequence"] = _rel_diff(res[1], res[0])
        if sweep:
            rows += ss2d_sweep(args, gy, tables, timer)
        del args, seq_args, gy
        if device == "cuda":
            torch.cuda.empty_cache()
    for batch, dim, n in shapes:  # whole SS2D modules (in_proj ... out_proj), bf16 autocast, per scan backend
        torch.manual_seed(0)
        module = SS2D(dim // 2, resolution=n).to(device)  # d_inner = 2 * the block's dim
        module.reset_ssm_parameters()
        u = torch.randn(batch, n, n, dim // 2, device=device, requires_grad=True)
        for backend in (["fused"] if have_mamba else []) + ["triton", "ss2d_triton"]:
            module.scan_backend = backend

            def fwd():
                with torch.autocast(device, dtype=torch.bfloat16):
                    return module(u)

            with torch.no_grad():
                t_fwd = timer(fwd)
            t_fb = timer(lambda: fwd().float().square().mean().backward())
            rows.append({"kernel": "ss2d_module", "shape": [batch, dim, n], "backend": backend, "fwd_ms": t_fwd,
                         "fwd_bwd_ms": t_fb})
        del module, u
    return rows


def ss2d_sweep(args, gy, tables, timer) -> list[dict]:
    import triton

    from lamamba_dist.ops import ss2d_triton as sst

    x, delta, B, C, A, D, bias = args
    A, paths, length = A.reshape(-1), tables[0], x.shape[1]
    rows = []

    def add(kind, launch, config):
        sweep_row(rows, timer, f"ss2d_{kind}_launch", x.shape, launch, config)

    for sub_d, tile in itertools.product([8, 16, 32], [1024, 2048, 4096]):
        chunk = min(triton.next_power_of_2(length), tile // sub_d)
        _, states = sst.ss2d_fwd_launch(x, delta, B, C, A, D, bias, paths, True, chunk, sub_d=sub_d)
        for nw in [2, 4, 8]:
            add("fwd", lambda: sst.ss2d_fwd_launch(x, delta, B, C, A, D, bias, paths, True, chunk, sub_d=sub_d,
                                                   num_warps=nw), {"sub_d": sub_d, "chunk": chunk, "num_warps": nw})
        for nw in [4, 8, 16]:
            add("bwd", lambda: sst.ss2d_bwd_launch(x, delta, B, C, A, D, bias, paths, gy, states, True, chunk,
                                                   sub_d=sub_d, num_warps=nw),
                {"sub_d": sub_d, "chunk": chunk, "num_warps": nw})
    return rows


# ----------------------------------------------------------------------------- SS2D's depthwise conv + SiLU


def bench_core(shapes, device: str, timer, sweep: bool) -> list[dict]:
    """SS2D's scan core (custom ops, channels-last, Triton kernels) with the rank padded (RANK_ALIGN 8, the
    default) and not (1); forward and forward+backward, bf16, and the largest difference of the two."""
    import math

    import torch

    from lamamba_dist.ops import ss2d_core as sc
    from lamamba_dist.ops.cross_scan import snake_tables

    rows = []
    default = sc.RANK_ALIGN
    for batch, dim, n in shapes:
        r, k, length = max(math.ceil(dim / 32), 1), GROUPS, n * n
        g = torch.Generator(device=device).manual_seed(0)
        mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device=device) * scale)  # noqa: E731
        x = mk(batch, length, dim).to(torch.bfloat16)
        wx = mk(k, r + 2, dim, scale=dim ** -0.5).to(torch.bfloat16)
        wdt = mk(k, dim, r, scale=r ** -0.5).to(torch.bfloat16)
        a = -torch.rand(k * dim, 1, generator=g, device=device) - 0.5
        ds, bias = mk(k * dim), mk(k * dim, scale=0.5) - 2.0
        paths, inverse = snake_tables(n, device)
        gy = torch.randn(batch, length, dim, device=device, dtype=torch.bfloat16)
        fn = lambda x_, wx_, wdt_: sc.ss2d_core(x_, wx_, wdt_, a, ds, bias, paths, inverse, "triton",  # noqa: E731
                                                channels_last=True, core="op")
        outs = []
        try:
            for align in (default, 1):
                sc.RANK_ALIGN = align
                fwd, fb = time_fwd_bwd(timer, fn, [x, wx, wdt], gy)
                rows.append({"kernel": "ss2d_core", "shape": [batch, dim, n], "rank": r, "rank_align": align,
                             "padded_rank": sc._padded_rank(r), "fwd_ms": fwd, "fwd_bwd_ms": fb,
                             "path": f"rank {sc._padded_rank(r)}"})
                leaves = [t.detach().requires_grad_() for t in (x, wx, wdt)]
                out = fn(*leaves)
                outs.append([out, *torch.autograd.grad(out, leaves, gy)])
        finally:
            sc.RANK_ALIGN = default
        rows[-1]["max_rel_diff_to_padded"] = _rel_diff(outs[1], outs[0])
        del x, gy, outs
    return rows


def bench_conv(shapes, device: str, timer, sweep: bool) -> list[dict]:
    """SS2D's depthwise 3x3 conv + SiLU (lamamba_dist/ops/dwconv.py) per backend, on the half of an in_proj output
    (B, n, n, 2D) as SS2D reads it, into the channels-last (B, n, n, D) layout the SS2D core reads (the default
    path, models/lamamba.py); forward and forward+backward, bf16."""
    import torch

    from lamamba_dist.ops.dwconv import dwconv_silu

    rows = []
    for batch, dim, n in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(batch, n, n, 2 * dim, generator=g, device=device).to(torch.bfloat16)[..., :dim]
        w = (torch.randn(dim, 1, 3, 3, generator=g, device=device) * 0.3).to(torch.bfloat16)
        gy = torch.randn(batch, n, n, dim, device=device, dtype=torch.bfloat16)
        outs = []
        for backend in ("torch", "triton_tiles", "triton"):
            fn = lambda x_, w_, b=backend: dwconv_silu(x_, w_, out_bdl=False, backend=b)  # noqa: E731
            fwd, fb = time_fwd_bwd(timer, fn, [x, w], gy)
            elems = batch * dim * n * n
            rows.append({"kernel": "dwconv_silu", "shape": [batch, dim, n], "backend": backend, "fwd_ms": fwd,
                         "fwd_bwd_ms": fb, "fwd_gb_per_s": 4 * elems / fwd / 1e6})
            leaves = [t.detach().requires_grad_() for t in (x, w)]
            out = fn(*leaves)
            outs.append([out, *torch.autograd.grad(out, leaves, gy)])
        for i in (1, 2):  # the tiles' row and the rows'
            rows[i - 3]["max_rel_diff_to_torch"] = _rel_diff(outs[i], outs[0])
        if sweep:
            rows += conv_sweep(x, w, gy, timer)
        del x, gy, outs
    return rows


def conv_sweep(x, w, gy, timer) -> list[dict]:
    """The Triton conv's kernels one by one over launch configurations: the row kernels (channels, rows, warps per
    program), the tile kernels (pixels, channels, warps), and the tiles' backward with its intermediate gradient in
    fp32 instead of the input's dtype (the default) and with the weight gradient taken by the gx kernel."""
    import torch

    from lamamba_dist.ops import dwconv_triton as dt

    batch, n, _, dim = x.shape
    rows = []

    def add(kind, launch, config):
        sweep_row(rows, timer, f"dwconv_{kind}_launch", (batch, dim, n), launch, config)

    # the row kernels (the default, K = 3): (channels, rows, warps) per program, each kernel over its configs
    # with the other at its default, channels-last as SS2D calls them
    gy_cl = gy
    gy = gy.permute(0, 3, 1, 2).contiguous()  # (B, D, n, n) for the tiles' rows, as they were measured
    row_configs = [(bd, r, nw) for bd, r, nw in itertools.product([64, 128, 256], [1, 2, 4], [1, 2])
                   if bd // (32 * nw) >= 2]
    for cfg in row_configs:
        add("rows_fwd", lambda: dt.dwconv_silu_fwd_launch(x, w, False, config=cfg, algo="rows"), list(cfg))
    for cfg in row_configs:
        add("rows_bwd_gs", lambda: dt.dwconv_silu_bwd_launch(x, w, gy_cl, False, gs_config=cfg, algo="rows"),
            list(cfg))
    for cfg in row_configs:
        add("rows_bwd_gx", lambda: dt.dwconv_silu_bwd_launch(x, w, gy_cl, False, gx_config=cfg, algo="rows"),
            list(cfg))
    # the tile kernels (conv_backend "triton_tiles"): (pixels, channels, warps) per program
    configs = [(bp, bd, nw) for bp, bd, nw in itertools.product([32, 64, 128, 256], [32, 64], [2, 4, 8])
               if 8 <= bp * bd // (32 * nw) <= 32]
    for cfg in configs:
        add("fwd", lambda: dt.dwconv_silu_fwd_launch(x, w, True, config=cfg, algo="tiles"), list(cfg))
    for cfg in configs:  # the gs kernel (+ the gx kernel at its default): a whole backward per config
        add("bwd_gs", lambda: dt.dwconv_silu_bwd_launch(x, w, gy, True, gs_config=cfg, algo="tiles"), list(cfg))
    for cfg in configs:
        add("bwd_gx", lambda: dt.dwconv_silu_bwd_launch(x, w, gy, True, gx_config=cfg, algo="tiles"), list(cfg))
    add("bwd_gs_fp32", lambda: dt.dwconv_silu_bwd_launch(x, w, gy, True, gs_dtype=torch.float32, algo="tiles"),
        "default")
    # the weight gradient taken by the gx kernel instead (the rows above take it in the gs kernel): over the gx
    # kernel's tiles, over the gs kernel's, and with gs in fp32
    for cfg in configs:
        add("bwd_gx_gw_in_gx", lambda: dt.dwconv_silu_bwd_launch(x, w, gy, True, gx_config=cfg, gw_in_gx=True,
                                                                 algo="tiles"), list(cfg))
    for cfg in configs:
        add("bwd_gs_gw_in_gx", lambda: dt.dwconv_silu_bwd_launch(x, w, gy, True, gs_config=cfg, gw_in_gx=True,
                                                                 algo="tiles"), list(cfg))
    add("bwd_gs_fp32_gw_in_gx", lambda: dt.dwconv_silu_bwd_launch(x, w, gy, True, gs_dtype=torch.float32,
                                                                  gw_in_gx=True, algo="tiles"), "default")
    return rows


# ----------------------------------------------------------------------------- window attention


def bench_attn(shapes, device: str, timer, sweep: bool) -> list[dict]:
    """Window attention with its bias, from qkv (B * nW, N, 3C) to (B * nW, N, C), per backend ("sdpa", the default,
    and "triton"), and "triton_tokens": the kernels on the map's tokens (B, L, 3C) read through the shifted window
    order, as the model runs them (its SDPA path adds a gather of the block's input and of the output); forward and
    forward+backward (qkv and bias gradients), bf16 qkv and an fp32 bias as under autocast."""
    import torch

    from lamamba_dist.ops.window_attention import window_attention, window_token_order

    rows = []
    for batch, dim, side in shapes:
        heads, window = min(ATTN_HEADS, dim), min(ATTN_WINDOW, side)
        nw, n = (side // window) ** 2, window * window
        g = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(batch * nw, n, 3 * dim, generator=g, device=device).to(torch.bfloat16)
        bias = torch.randn(nw, heads, n, n, generator=g, device=device)
        gy = torch.randn(batch * nw, n, dim, device=device, dtype=torch.bfloat16)
        order = window_token_order(side, window, window // 2 if side > window else 0)[0].to(device)
        outs = []
        for backend in ("sdpa", "triton", "triton_tokens"):
            if backend == "triton_tokens":  # the model's path: the map's tokens read through the shifted order
                fn = lambda q_, b_: window_attention(q_.view(batch, nw * n, -1), b_, heads, "triton",  # noqa: E731
                                                     order=order).view(batch * nw, n, -1)
            else:
                fn = lambda q_, b_, be=backend: window_attention(q_, b_, heads, be)  # noqa: E731
            fwd, fb = time_fwd_bwd(timer, fn, [qkv, bias], gy)
            # bytes that must move, in elements of the output: qkv read (3), the output written (1) in the forward;
            # qkv, the output and its gradient read (5), the qkv gradient written (3) in the backward; the bias is
            # small beside them
            elems = batch * nw * n * dim
            rows.append({"kernel": "window_attention", "shape": [batch, dim, side], "heads": heads, "window": window,
                         "backend": backend, "fwd_ms": fwd, "fwd_bwd_ms": fb,
                         "fwd_gb_per_s": 2 * 4 * elems / fwd / 1e6, "fwd_bwd_gb_per_s": 2 * 12 * elems / fb / 1e6})
            leaves = [t.detach().requires_grad_() for t in (qkv, bias)]
            out = fn(*leaves)
            outs.append([out, *torch.autograd.grad(out, leaves, gy)])
        rows[-2]["max_rel_diff_to_sdpa"] = _rel_diff(outs[1], outs[0])
        if sweep:
            rows += attn_sweep(qkv, bias, gy, heads, timer, (batch, dim, side))
        del qkv, gy, outs
    return rows


def attn_sweep(qkv, bias, gy, heads, timer, shape) -> list[dict]:
    """The Triton window attention's kernels over launch configurations: the forward's warps, the backward's warps
    and about how many backward programs (the images each walks, whose bias-gradient partials torch sums)."""
    from lamamba_dist.ops import window_attention_triton as wat

    rows = []
    for nw in (2, 4, 8):
        sweep_row(rows, timer, "window_attention_fwd", shape,
                  lambda: wat.window_attention_fwd_launch(qkv, bias, heads, fwd_warps=nw), [nw])
    out, lse = wat.window_attention_fwd_launch(qkv, bias, heads)
    for nw, programs in itertools.product((4, 8), (512, 1024, 2048, 4096, 16384)):
        sweep_row(rows, timer, "window_attention_bwd", shape,
                  lambda: wat.window_attention_bwd_launch(gy, qkv, bias, out, lse, heads, programs=programs,
                                                          bwd_warps=nw),
                  [nw, programs])
    return rows


# ----------------------------------------------------------------------------- the snake gather / merge


def bench_snake(shapes, device: str, timer, sweep: bool) -> list[dict]:
    """gather (B, L, D) -> (B, 4, D, L) and merge back, per path: torch eager, torch compiled, Triton."""
    import torch

    from lamamba_dist.ops import cross_scan_triton as ct
    from lamamba_dist.ops.cross_scan import gather_cl_reference, merge_cl_reference, snake_tables

    rows = []
    for batch, dim, n in shapes:
        length = n * n
        paths, inverse = snake_tables(n, device)
        g = torch.Generator(device=device).manual_seed(0)
        x_cl = torch.randn(batch, length, dim, generator=g, device=device).to(torch.bfloat16)
        ys = torch.randn(batch, 4, dim, length, generator=g, device=device).to(torch.bfloat16)
        ops = {"gather": (x_cl, paths, gather_cl_reference, ct.gather_cl_launch),
               "merge": (ys, inverse, merge_cl_reference, ct.merge_cl_launch)}
        for op, (inp, table, ref, launch) in ops.items():
            want = ref(inp, table)
            paths_fns = {"torch": ref, "triton": launch}
            if device == "cuda":  # what a compiled training step runs (one fused kernel per op)
                paths_fns["torch_compiled"] = torch.compile(ref, fullgraph=True, dynamic=False)
            for path, fn in paths_fns.items():
                ms = timer(lambda fn=fn: fn(inp, table))
                got = fn(inp, table)
                elems = batch * length * dim
                rows.append({"kernel": f"snake_{op}", "shape": [batch, dim, n], "path": path, "ms": ms,
                             "gb_per_s": 10 * elems / ms / 1e6, "max_rel_diff_to_torch": _rel_diff([got], [want])})
                print("# snake", json.dumps(rows[-1]), flush=True)
            if sweep:
                configs = (list(itertools.product([32, 64, 128], [32, 64, 128], [2, 4, 8])) if op == "gather"
                           else list(itertools.product([4, 8, 16], [32, 64, 128], [2, 4, 8], [False, True])))
                for cfg in configs:
                    sweep_row(rows, timer, f"snake_{op}", (batch, dim, n), lambda c=cfg: launch(inp, table, c), list(cfg))
        if length <= 256:
            rows += fused_snake_scan_rows(batch, dim, n, device, timer, sweep)
        del x_cl, ys
    return rows


def fused_snake_scan_rows(batch: int, dim: int, n: int, device: str, timer, sweep: bool) -> list[dict]:
    """SS2D's scan core between the channels-last map and its merged output, forward and backward, bf16: the
    unfused kernels (snake gather, the Triton scan, snake merge; the backward gathers x and the output gradient
    again) against the fused short-sequence kernels (lamamba_dist/ops/snake_scan_triton.py); with ``sweep`` the
    fused kernels over launch configurations (channels a program, warps, stages)."""
    import torch
    import triton

    from lamamba_dist.ops import cross_scan_triton as ct
    from lamamba_dist.ops import scan_triton as st
    from lamamba_dist.ops import snake_scan_triton as sst
    from lamamba_dist.ops.cross_scan import snake_tables

    length, k = n * n, 4
    paths, inverse = snake_tables(n, device)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, length, dim, generator=g, device=device).to(torch.bfloat16)
    delta = (torch.randn(batch, k * dim, length, generator=g, device=device) * 0.5 - 1).to(torch.bfloat16)
    bs, cs = (torch.randn(batch, k, 1, length, generator=g, device=device).to(torch.bfloat16) for _ in range(2))
    a = -torch.rand(k * dim, 1, generator=g, device=device) - 0.1
    dv, bias = torch.randn(k * dim, device=device), torch.randn(k * dim, device=device) * 0.3
    gy = torch.randn(batch, length, dim, device=device, dtype=torch.bfloat16)
    chunk = st.default_chunk(length)

    def unfused_fwd():
        xs = ct.gather_cl_launch(x, paths)
        out, _ = st.scan1_fwd_launch(xs.view(batch, k * dim, length), delta, a, bs, cs, dv, bias, True, chunk,
                                     y=xs.view(batch, k * dim, length))
        return ct.merge_cl_launch(out.view(batch, k, dim, length), inverse)

    states = st.scan1_fwd_launch(ct.gather_cl_launch(x, paths).view(batch, k * dim, length), delta, a, bs, cs, dv,
                                 bias, True, chunk)[1]
    dcopy = delta.clone()

    def unfused_bwd():
        xs = ct.gather_cl_launch(x, paths).view(batch, k * dim, length)
        gout = ct.gather_cl_launch(gy, paths).view(batch, k * dim, length)
        du = st.scan1_bwd_launch(xs, dcopy, a, bs, cs, dv, bias, gout, states, True, chunk, gu=gout)[0]
        return ct.merge_cl_launch(du.view(batch, k, dim, length), inverse)

    rows = []
    shape = [batch, dim, n]
    for name, fn in (("fwd", unfused_fwd), ("bwd", unfused_bwd),
                     ("fwd", lambda: sst.snake_scan_fwd(x, delta, bs, cs, a, dv, bias, paths, inverse)),
                     ("bwd", lambda: sst.snake_scan_bwd(x, dcopy, bs, cs, a, dv, bias, paths, inverse, gy))):
        path = "fused" if len(rows) >= 2 else "unfused"
        rows.append({"kernel": f"snake_scan_{name}", "shape": shape, "path": path, "ms": timer(fn)})
        print("# snake_scan", json.dumps(rows[-1]), flush=True)
    if sweep:
        for sub_d, nw, stages in itertools.product([8, 16, 32, 64], [2, 4, 8], [1, 2]):
            per_thread = triton.next_power_of_2(length) * sub_d // (32 * nw)
            if not 2 <= per_thread <= 16 or sub_d > dim:
                continue
            cfg = dict(sub_d=sub_d, num_warps=nw, stages=stages)
            sweep_row(rows, timer, "snake_scan_fwd", shape,
                      lambda: sst.snake_scan_fwd(x, delta, bs, cs, a, dv, bias, paths, inverse, **cfg),
                      [sub_d, nw, stages])
            sweep_row(rows, timer, "snake_scan_bwd", shape,
                      lambda: sst.snake_scan_bwd(x, dcopy, bs, cs, a, dv, bias, paths, inverse, gy, **cfg),
                      [sub_d, nw, stages])
    return rows


# ----------------------------------------------------------------------------- command


def run_bench(what: str, shapes, device: str, sweep: bool = False, reps: int = 3) -> dict:
    import triton

    timer = _timer(device, reps)
    rows = {"scan": bench_scan, "ss2d": bench_ss2d, "conv": bench_conv, "snake": bench_snake,
            "core": bench_core, "attn": bench_attn}[what](shapes, device, timer, sweep)
    return {"bench": "kernels", "environment": environment(device, triton=triton.__version__,
                                                           interpreter=os.environ.get("TRITON_INTERPRET") == "1"),
            "settings": {"what": what, "shapes": [list(s) for s in shapes], "sweep": sweep}, "results": rows}


def _shapes(text: str):
    from lamamba_dist.errors import CLIError

    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise CLIError(f"--shapes {text!r}: give AxBxC triples separated by commas, e.g. 64x2560x1024")
    return shapes


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("scan", "ss2d", "conv", "snake", "core", "attn"), default="scan",
                   help="scan: the sequence scan by backend; ss2d: SS2D's scan paths and modules; conv: SS2D's "
                        "depthwise conv + SiLU by backend; snake: the channels-last snake gather / merge by path; "
                        "core: SS2D's whole scan core with its rank padded and not; attn: window attention by backend")
    p.add_argument("--shapes", default=None, help="batch x dim x L (scan), batch x d_inner x map side (ss2d, conv, "
                   "snake or core) or batch x C x map side (attn), comma separated (default: LaMamba-XL's)")
    p.add_argument("--sweep", action="store_true", help="also time launch configurations of the Triton kernels")
    p.add_argument("--device", default=None, help="cuda (default), or cpu for a smoke run under TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help="write the JSON here (always printed)")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    import importlib.util

    import torch

    from lamamba_dist.errors import CLIError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise CLIError(f"--device {device!r}: cuda or cpu")
    if importlib.util.find_spec("triton") is None:
        raise CLIError("`lamamba bench kernels` needs triton (it ships with CUDA builds of torch)")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise CLIError("the kernels run on a CUDA GPU; on a CPU only as a smoke run under Triton's interpreter "
                       "(TRITON_INTERPRET=1 lamamba bench kernels --device cpu --shapes 1x8x16)")
    shapes = _shapes(args.shapes) if args.shapes else {"scan": SCAN_SHAPES, "attn": ATTN_SHAPES}.get(args.what,
                                                                                                   SS2D_SHAPES)
    out = run_bench(args.what, shapes, device, args.sweep)
    print(write_json(args.out, out))
    for r in out["results"]:
        if "gb_per_s" in r and "path" in r:
            print(f"# {r['kernel']:14s} {'x'.join(map(str, r['shape'])):>14s} {r['path']:>16s}  {r['ms']:8.3f} ms  "
                  f"{r['gb_per_s']:7.0f} GB/s")
        if "fwd_ms" in r:
            label = r.get("backend") or r.get("path")
            print(f"# {r['kernel']:14s} {'x'.join(map(str, r['shape'])):>14s} {label:>16s}  fwd {r['fwd_ms']:8.3f} ms  "
                  f"fwd+bwd {r['fwd_bwd_ms']:8.3f} ms")
    return 0
