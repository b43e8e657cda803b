"""Every Triton kernel LaMamba-XL's training launches, compiled for an H100/H200 (sm_90) on this machine, GPU or not.

The interpreter tests run the kernels' Python on CPU tensors; what only Triton's compiler rejects (a name typed
differently in the two branches of an ``if``, an op it cannot lower, a constexpr specialization such as an
argument equal to 1) would otherwise first show at the first launch on the GPU. Here each launcher runs on CPU
tensors of LaMamba-XL's shapes at 256 and 512 px (batch 2 or 1), its launches are captured instead of run, and
each kernel is compiled with the argument types and constexprs of that launch (tests/helpers/kernel_helpers.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_helpers import compile_launches_for_sm90, needs_triton

# (side of the map, d_inner) of LaMamba-XL's SS2D stages at 256 px (latent 32x32) and 512 px (64x64)
STAGES_256 = [(32, 640), (16, 1280), (8, 2560)]
STAGES_512 = [(64, 640), (32, 1280), (16, 2560)]
K = 4  # snake directions


def _scan_launches(batch, side, d, dtype=torch.bfloat16):
    from lamamba_dist.ops import scan_triton as st

    length, dim = side * side, K * d
    u = torch.zeros(batch, dim, length, dtype=dtype)
    A, D, bias = torch.zeros(dim, 1), torch.zeros(dim), torch.zeros(dim)
    B = C = torch.zeros(batch, K, 1, length, dtype=dtype)
    channel_major = torch.zeros(dim, batch, length, dtype=dtype).transpose(0, 1)
    for delta in (torch.zeros_like(u), channel_major):
        y, states = st.scan1_fwd_launch(u, delta, A, B, C, D, bias, True)
        st.scan1_bwd_launch(u, delta, A, B, C, D, bias, torch.zeros_like(u), states, True)


def _snake_launches(batch, side, d, dtype=torch.bfloat16):
    from lamamba_dist.ops import cross_scan_triton as cst
    from lamamba_dist.ops import snake_scan_triton as sst
    from lamamba_dist.ops.cross_scan import snake_tables

    length = side * side
    paths, inverse = snake_tables(side)
    x = torch.zeros(batch, length, d, dtype=dtype)
    cst.gather_cl_launch(x, paths)
    cst.merge_cl_launch(torch.zeros(batch, K, d, length, dtype=dtype), inverse)
    if sst.eligible(length, forward=True):  # the opt-in fused snake scan (snake_backend "fused")
        delta = torch.zeros(batch, K * d, length, dtype=dtype)
        B = C = torch.zeros(batch, K, 1, length, dtype=dtype)
        A, D, bias = torch.zeros(K * d, 1), torch.zeros(K * d), torch.zeros(K * d)
        sst.snake_scan_fwd(x, delta, B, C, A, D, bias, paths, inverse)
        sst.snake_scan_bwd(x, delta, B, C, A, D, bias, paths, inverse, torch.zeros_like(x))


def _conv_launches(batch, side, d, dtype=torch.bfloat16):
    from lamamba_dist.ops import dwconv_triton as dct

    x = torch.zeros(batch, side, side, d, dtype=dtype)
    w = torch.zeros(d, 1, 3, 3, dtype=dtype)
    for out_bdl, algo in itertools.product((False, True), dct.ALGOS):
        y = dct.dwconv_silu_fwd_launch(x, w, out_bdl, algo=algo)
        dct.dwconv_silu_bwd_launch(x, w, torch.zeros_like(y), out_bdl, algo=algo)


def _ss2d_launches(batch, side, d, dtype=torch.bfloat16):  # the opt-in scan_backend "ss2d_triton"
    from lamamba_dist.ops import ss2d_triton as s2t
    from lamamba_dist.ops.cross_scan import snake_tables

    length = side * side
    paths, _ = snake_tables(side)
    x = torch.zeros(batch, length, d, dtype=dtype)
    delta = torch.zeros(batch, length, K, d, dtype=dtype)
    B = C = torch.zeros(batch, length, K, dtype=dtype)
    A, D, bias = torch.zeros(K * d), torch.zeros(K * d), torch.zeros(K * d)
    _, states = s2t.ss2d_fwd_launch(x, delta, B, C, A, D, bias, paths)
    s2t.ss2d_bwd_launch(x, delta, B, C, A, D, bias, paths, torch.zeros_like(x), states)


def _attn_launches(batch, side, d, dtype=torch.bfloat16):  # the opt-in attn_backend "triton"; C = d_inner / 2
    from lamamba_dist.ops import window_attention_triton as wat

    c, heads, window = d // 2, 16, min(8, side)
    nw, n = (side // window) ** 2, window * window
    qkv = torch.zeros(batch * nw, n, 3 * c, dtype=dtype)
    bias = torch.zeros(nw, heads, n, n, dtype=dtype)  # window_attention gives it in qkv's dtype
    out, lse = wat.window_attention_fwd_launch(qkv, bias, heads)
    wat.window_attention_bwd_launch(out, qkv, bias, out, lse, heads)
    tokens, order = qkv.view(batch, nw * n, 3 * c), torch.arange(nw * n)  # the model's layout, through the order
    out, lse = wat.window_attention_fwd_launch(tokens, bias, heads, order)
    wat.window_attention_bwd_launch(out, tokens, bias, out, lse, heads, order)


@needs_triton
@pytest.mark.parametrize("what", ["scan", "snake", "conv", "ss2d", "attn"])
@pytest.mark.parametrize("resolution", [256, 512])
def test_lamamba_xl_kernels_compile_for_sm90(what, resolution):
    launches = {"scan": _scan_launches, "snake": _snake_launches, "conv": _conv_launches, "ss2d": _ss2d_launches,
                "attn": _attn_launches}[what]
    stages = STAGES_256 if resolution == 256 else STAGES_512

    def run():
        for side, d in stages:
            launches(2, side, d)
        launches(1, *stages[-1])  # batch 1: integer arguments equal to 1 become constexprs

    names = compile_launches_for_sm90(run)
    expected = {"scan": {"_scan1_fwd_kernel", "_scan1_bwd_kernel", "_bwd_sums_kernel"},
                "snake": {"_gather_cl_kernel"}, "conv": {"_dwconv_fwd_kernel", "_dwconv_bwd_gs_kernel",
                                                         "_dwconv_bwd_gx_kernel", "_dwconv_fwd_rows_kernel",
                                                         "_dwconv_bwd_gs_rows_kernel", "_dwconv_bwd_gx_rows_kernel"},
                "ss2d": {"_ss2d_fwd_kernel", "_ss2d_bwd_kernel"},
                "attn": {"_wattn_fwd_kernel", "_wattn_bwd_kernel"}}[what]
    assert expected <= set(names), names


@needs_triton
def test_the_ema_kernel_compiles_for_sm90():
    """The trainer's one-pass EMA update (lamamba_dist/ops/ema_update.py), run after every optimizer step on GPU."""
    from lamamba_dist.ops.ema_update import ema_update_

    def run():
        ema_update_(torch.zeros(10_000), torch.zeros(10_000), 0.9999, use_kernel=True)

    assert compile_launches_for_sm90(run) == ["_ema_kernel"]


@needs_triton
def test_the_compile_check_catches_what_the_interpreter_does_not():
    """A kernel whose two branches give one name two types runs under the interpreter but does not compile."""
    import triton
    import triton.language as tl
    from triton.compiler.errors import CompilationError

    @triton.jit
    def branchy(x_ptr, n, BLK_A: tl.constexpr, BLK_B: tl.constexpr):
        if tl.program_id(0) < n:
            acc = tl.zeros([BLK_A], dtype=tl.float32)
        else:
            acc = tl.zeros([BLK_B], dtype=tl.float32)
        tl.store(x_ptr + tl.arange(0, BLK_A), tl.sum(acc, axis=0))

    def run():
        branchy[(2,)](torch.zeros(64), 2, BLK_A=64, BLK_B=32)

    with pytest.raises(CompilationError, match="Mismatched type"):
        compile_launches_for_sm90(run)
