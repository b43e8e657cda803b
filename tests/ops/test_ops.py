"""Every fast op against its reference: forward and all gradients (fp32 on CPU; bf16/fp32 on GPU)."""

import pytest
import torch

from lamamba_dist.ops import (
    cross_merge,
    cross_merge_reference,
    cross_scan,
    cross_scan_reference,
    relative_offset_onehot,
    relative_position_bias,
    relative_position_index,
    selective_scan,
    selective_scan_reference,
    shift_attention_mask,
    snake_tables,
    window_attention_core,
)
from lamamba_dist.ops import cross_scan as cs_mod  # noqa: F401

SPEC_PATHS = {  # the official paths (docs/model.md §4) (flat indices)
    (2, 0): ([0, 1, 3, 2], [0, 1, 3, 2]),
    (2, 1): ([2, 3, 1, 0], [3, 2, 0, 1]),
    (2, 2): ([2, 0, 1, 3], [1, 2, 0, 3]),
    (2, 3): ([3, 1, 0, 2], [2, 1, 3, 0]),
    (3, 0): ([0, 1, 2, 5, 4, 3, 6, 7, 8], [0, 1, 2, 5, 4, 3, 6, 7, 8]),
    (3, 1): ([6, 7, 8, 5, 4, 3, 0, 1, 2], [6, 7, 8, 5, 4, 3, 0, 1, 2]),
    (3, 2): ([6, 3, 0, 1, 4, 7, 8, 5, 2], [2, 3, 8, 1, 4, 7, 0, 5, 6]),
    (3, 3): ([8, 5, 2, 1, 4, 7, 6, 3, 0], [8, 3, 2, 7, 4, 1, 6, 5, 0]),
    (4, 0): ([0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12], [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12]),
    (4, 1): ([12, 13, 14, 15, 11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0], [15, 14, 13, 12, 8, 9, 10, 11, 7, 6, 5, 4, 0, 1, 2, 3]),
    (4, 2): ([12, 8, 4, 0, 1, 5, 9, 13, 14, 10, 6, 2, 3, 7, 11, 15], [3, 4, 11, 12, 2, 5, 10, 13, 1, 6, 9, 14, 0, 7, 8, 15]),
    (4, 3): ([15, 11, 7, 3, 2, 6, 10, 14, 13, 9, 5, 1, 0, 4, 8, 12], [12, 11, 4, 3, 13, 10, 5, 2, 14, 9, 6, 1, 15, 8, 7, 0]),
}


@pytest.mark.parametrize("n,k", sorted(SPEC_PATHS))
def test_snake_paths_match_spec_vectors(n, k):
    paths, inverse = snake_tables(n)
    assert paths[k].tolist() == SPEC_PATHS[(n, k)][0]
    assert inverse[k].tolist() == SPEC_PATHS[(n, k)][1]


def test_snake_tables_are_cached_not_rebuilt():
    a = snake_tables(5)
    b = snake_tables(5)
    assert a[0] is b[0] and a[1] is b[1]


@pytest.mark.parametrize("n", [1, 3, 4, 7])
def test_cross_scan_and_merge_match_reference_with_grads(n):
    torch.manual_seed(n)
    x = torch.randn(2, 5, n, n, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    ys, yr = cross_scan(x), cross_scan_reference(xr)
    assert torch.equal(ys, yr)
    g = torch.randn_like(ys)
    ys.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-6)  # 4 paths summed in another order

    y = torch.randn(2, 4, 5, n * n, requires_grad=True)
    y2 = y.detach().clone().requires_grad_()
    m, mr = cross_merge(y, n), cross_merge_reference(y2, n)
    torch.testing.assert_close(m, mr, rtol=0, atol=1e-6)
    g = torch.randn_like(m)
    m.backward(g)
    mr.backward(g)
    torch.testing.assert_close(y.grad, y2.grad, rtol=0, atol=1e-6)
    # merge(scan(x)) = 4x (docs/model.md §4)
    torch.testing.assert_close(cross_merge(cross_scan(x.detach()), n), 4 * x.detach().flatten(2))


def test_cross_scan_rejects_non_square_map():
    with pytest.raises(ValueError, match="square"):
        cross_scan(torch.randn(1, 2, 3, 5))


def _scan_inputs(batch, groups, d, n, length, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = groups * d
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    u = mk(batch, dim, length).to(dtype)
    delta = mk(batch, dim, length, scale=0.5).to(dtype)
    A = -torch.exp(mk(dim, n, scale=0.5))
    B = mk(batch, groups, n, length).to(dtype)
    C = mk(batch, groups, n, length).to(dtype)
    D = mk(dim)
    bias = mk(dim, scale=0.5) - 2.0
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, bias)]


def _naive_scan(u, delta, A, B, C, D, bias):
    """An independent restatement of docs/model.md §3 (step 6) in float64 with explicit loops over (b, channel, step)."""
    u, delta, A, B, C, D, bias = (t.double() for t in (u, delta, A, B, C, D, bias))
    batch, dim, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    out = torch.zeros_like(u)
    for b in range(batch):
        for ch in range(dim):
            k = ch // (dim // groups)
            h = torch.zeros(n, dtype=torch.float64)
            for s in range(length):
                dt = torch.nn.functional.softplus(delta[b, ch, s] + bias[ch])
                h = torch.exp(dt * A[ch]) * h + dt * B[b, k, :, s] * u[b, ch, s]
                out[b, ch, s] = (C[b, k, :, s] * h).sum() + D[ch] * u[b, ch, s]
    return out


def test_selective_scan_reference_matches_naive_restatement():
    args = _scan_inputs(2, 4, 3, 1, 9, torch.float32, "cpu")
    ref = selective_scan_reference(*args)
    naive = _naive_scan(*[a.detach() for a in args])
    torch.testing.assert_close(ref.double(), naive, rtol=1e-5, atol=1e-5)


def test_selective_scan_dispatch_on_cpu_is_reference():
    args = _scan_inputs(1, 4, 2, 1, 5, torch.float32, "cpu")
    torch.testing.assert_close(selective_scan(*args), selective_scan_reference(*args), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown scan backend"):
        selective_scan(*args, backend="nope")


def _attn_inputs(bw, nw, h, n, e, dtype, device, shifted, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(bw, h, n, e, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    bias = (torch.randn(1, h, n, n, generator=g) * 0.5).to(device)
    if shifted:
        side = int(n ** 0.5) * int(nw ** 0.5)
        w = int(n ** 0.5)
        bias = bias + shift_attention_mask(side, w, w // 2, device).unsqueeze(1)
    return q, k, v, bias.requires_grad_()


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_sdpa_matches_reference_with_grads(shifted):
    nw = 4
    q, k, v, bias = _attn_inputs(2 * nw, nw, 2, 16, 8, torch.float32, "cpu", shifted)
    leaves = [q, k, v, bias]
    out = window_attention_core(q, k, v, bias, nw, "sdpa")
    grads = torch.autograd.grad(out.square().sum(), leaves)
    out_r = window_attention_core(q, k, v, bias, nw, "reference")
    grads_r = torch.autograd.grad(out_r.square().sum(), leaves)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("r,w,s", [(8, 4, 0), (8, 4, 2), (16, 8, 4), (4, 4, 0)])
def test_window_token_order_equals_roll_then_partition(r, w, s):
    from lamamba_dist.ops import permute_tokens, window_partition, window_reverse, window_token_order

    g = torch.Generator().manual_seed(r + w + s)
    x = torch.randn(3, r, r, 5, generator=g, dtype=torch.float64, requires_grad=True)
    order, inverse = window_token_order(r, w, s)
    assert sorted(order.tolist()) == list(range(r * r)) and (order[inverse] == torch.arange(r * r)).all()
    ref = window_partition(torch.roll(x, shifts=(-s, -s), dims=(1, 2)), w)
    win = permute_tokens(x.reshape(3, r * r, 5), order, inverse).view_as(ref)
    assert torch.equal(win, ref)
    back = permute_tokens(win.reshape(3, r * r, 5), inverse, order).view(3, r, r, 5)
    assert torch.equal(back, torch.roll(window_reverse(ref, w, r, r), shifts=(s, s), dims=(1, 2)))
    assert torch.equal(back, x)
    # gather-only backward is the exact adjoint of the permutation
    torch.autograd.gradcheck(lambda t: permute_tokens(t, order, inverse), (x.reshape(3, r * r, 5),))


def test_shift_mask_regions_and_relative_index():
    m = shift_attention_mask(8, 4, 2, "cpu")
    assert m.shape == (4, 16, 16)
    assert set(m.unique().tolist()) == {0.0, -100.0}
    assert (m[0] == 0).all()  # the top-left window is one region in the shifted frame
    idx = relative_position_index(4)
    assert idx.shape == (16, 16) and idx.min() == 0 and idx.max() == 48
    assert (idx.diagonal() == (4 - 1) * 7 + 4 - 1).all()


@pytest.mark.parametrize("w", [1, 2, 3, 8])
def test_relative_position_bias_is_the_indexed_table(w):
    # the contraction with one-hot offsets is the gather table[relative_position_index] exactly, and its gradient
    # is the gather's (a scatter-add) up to fp32 summation order
    h = 3
    table = torch.randn((2 * w - 1) ** 2, h, dtype=torch.float64, requires_grad=True)
    ref = table[relative_position_index(w).reshape(-1)].view(w * w, w * w, h).permute(2, 0, 1)
    out = relative_position_bias(table, relative_offset_onehot(w))
    assert out.shape == (h, w * w, w * w) and torch.equal(out, ref)
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, table, g)
    (g_out,) = torch.autograd.grad(out, table, g)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-12, atol=1e-12)
    # fp32 table under bf16 autocast with a bf16 one-hot (a model cast to bf16): still the fp32 entries, unrounded
    t32 = table.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out32 = relative_position_bias(t32, relative_offset_onehot(w).bfloat16())
    assert out32.dtype == torch.float32 and torch.equal(out32, t32[relative_position_index(w).reshape(-1)]
                                                            .view(w * w, w * w, h).permute(2, 0, 1))
    # shapes alone on the meta device (how the benches count FLOPs), where autocast has no dtype
    meta = relative_position_bias(torch.empty((2 * w - 1) ** 2, h, device="meta"), relative_offset_onehot(w, "meta"))
    assert meta.shape == (h, w * w, w * w)


# ----------------------------------------------------------------------------- GPU parity


def _tol(dtype):
    # bf16 tolerances: what a plain bf16 PyTorch path achieves against fp32 is ~1e-2 relative.
    return dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [64, 1024])
def test_fused_selective_scan_matches_reference(dtype, length):
    from lamamba_dist.ops.selective_scan import fused_available, selective_scan_fused

    if not fused_available():
        pytest.skip("mamba-ssm's selective_scan_cuda is not installed")
    args = _scan_inputs(2, 4, 32, 1, length, dtype, "cuda")
    out = selective_scan_fused(*args)
    grads = torch.autograd.grad(out.float().square().sum(), args)
    ref_args = [a.detach().float().requires_grad_() for a in args]
    out_r = selective_scan_reference(*ref_args)
    grads_r = torch.autograd.grad(out_r.square().sum(), ref_args)
    print("scan fwd max diff", (out.float() - out_r).abs().max().item())
    torch.testing.assert_close(out.float(), out_r, **_tol(dtype))
    for name, a, b in zip("u delta A B C D bias".split(), grads, grads_r):
        scale = b.abs().max().clamp(min=1.0)
        err = ((a.float() - b).abs().max() / scale).item()
        print(f"grad {name}: rel max err {err:.2e}")
        assert err < (1e-4 if dtype == torch.float32 else 5e-2), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("e", [20, 40, 80])
def test_sdpa_window_attention_matches_reference_on_gpu(dtype, shifted, e):
    nw = 16
    q, k, v, bias = _attn_inputs(4 * nw, nw, 4, 64, e, dtype, "cuda", shifted)
    out = window_attention_core(q, k, v, bias, nw, "sdpa")
    grads = torch.autograd.grad(out.float().square().sum(), [q, k, v, bias])
    ref = [t.detach().float().requires_grad_() for t in (q, k, v, bias)]
    out_r = window_attention_core(*ref, nw, "reference")
    grads_r = torch.autograd.grad(out_r.square().sum(), ref)
    torch.testing.assert_close(out.float(), out_r, **_tol(dtype))
    for a, b in zip(grads, grads_r):
        scale = b.abs().max().clamp(min=1.0)
        assert ((a.float() - b).abs().max() / scale).item() < (1e-4 if dtype == torch.float32 else 5e-2)


def test_cross_scan_merge_custom_backward_passes_gradcheck():
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cross_scan, (x,))
    y = torch.randn(1, 4, 2, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, 3), (y,))


def test_ss2d_uses_its_own_snake_table_buffers():
    """SS2D built for a map size reads the snake tables from its buffers (constants that follow .to(device)),
    not from the global per-device cache."""
    from unittest import mock

    from lamamba_dist.models.lamamba import SS2D

    op = SS2D(8, resolution=4, scan_backend="reference")
    op.reset_ssm_parameters()
    cache_used = AssertionError("the global snake-table cache was used")
    with mock.patch("lamamba_dist.models.lamamba.snake_tables", side_effect=cache_used), \
            mock.patch("lamamba_dist.ops.cross_scan.snake_tables", side_effect=cache_used):
        out = op(torch.randn(1, 4, 4, 8))
    assert out.shape == (1, 4, 4, 8)


def test_triton_module_is_none_where_the_module_does_not_import(monkeypatch):
    import importlib.util
    import sys

    from lamamba_dist.ops.optional_kernels import triton_module

    assert triton_module("no_such_kernels") is None
    if importlib.util.find_spec("triton") is not None:
        assert triton_module("dwconv_triton").__name__ == "lamamba_dist.ops.dwconv_triton"
    monkeypatch.setitem(sys.modules, "triton", None)  # an import of triton now raises ImportError
    monkeypatch.delitem(sys.modules, "lamamba_dist.ops.window_attention_triton", raising=False)
    assert triton_module("window_attention_triton") is None
