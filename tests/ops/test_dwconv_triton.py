"""SS2D's depthwise conv + SiLU (lamamba_dist/ops/dwconv.py dispatch, ops/dwconv_triton.py kernels).

* CPU, always: the PyTorch path equals SS2D's former expression in both layouts; the "auto" default is the Triton
  kernel on CUDA where triton imports and the PyTorch path otherwise; the state dict does not depend on the backend; "triton" without triton is an error, not a fallback.
* CPU under Triton's interpreter (a subprocess running this file with TRITON_INTERPRET=1), skipped where triton is
  not installed: output and both gradients against float64, both output layouts, strided inputs (the half of
  in_proj's output), maps and channel counts that do not fill a block, K 3 and 5, bf16, determinism, SS2D with
  conv_backend "triton" against "torch" (also under torch.compile(fullgraph=True, backend="aot_eager")).
  Outputs are NaN-poisoned first.
* GPU (``-m gpu``): the same at LaMamba-XL's widths and map sides, fp32 and bf16, and a whole LaMamba-debug
  forward/backward against the reference backends.
"""

import copy
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from kernel_helpers import (assert_compiles_like_eager, assert_models_match, fast_and_reference_debug_models,
                            nan_poisoned_empty, needs_triton, run_interpreter_cases, ss2d_run)
from lamamba_dist.models.lamamba import SS2D
from lamamba_dist.ops.dwconv import CONV_BACKENDS, dwconv_silu, dwconv_silu_reference


def _inputs(b, h, w, d, k, dtype, device, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # the first half of a (B, H, W, 2D) tensor, as SS2D's x is of in_proj's output
        x = torch.randn(b, h, w, 2 * d, generator=g).to(device, dtype)[..., :d]
    else:
        x = torch.randn(b, h, w, d, generator=g).to(device, dtype)
    wt = (torch.randn(d, 1, k, k, generator=g) * 0.3).to(device, dtype)
    return x.detach().requires_grad_(), wt.requires_grad_()


def _f64(x, wt, out_bdl):
    """The function in float64 (the yardstick of both paths)."""
    k = wt.shape[-1]
    y = F.silu(F.conv2d(x.double().permute(0, 3, 1, 2), wt.double(), padding=k // 2, groups=wt.shape[0]))
    return y if out_bdl else y.permute(0, 2, 3, 1)


def _check(b, h, w, d, k, dtype, device, out_bdl, strided=False, tol=1e-5, backend="triton"):
    x, wt = _inputs(b, h, w, d, k, dtype, device, strided=strided)  # strided: stride(2) == 2D
    out = dwconv_silu(x, wt, out_bdl=out_bdl, backend=backend)
    assert out.dtype == x.dtype and out.is_contiguous()
    assert out.shape == ((b, d, h, w) if out_bdl else (b, h, w, d))
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    gx, gw = torch.autograd.grad(out, [x, wt], gy)
    x64 = x.detach().double().requires_grad_()
    w64 = wt.detach().double().requires_grad_()
    ref = _f64(x64, w64, out_bdl)
    rgx, rgw = torch.autograd.grad(ref, [x64, w64], gy.double())
    for name, got, want in (("out", out, ref), ("gx", gx, rgx), ("gw", gw, rgw)):
        assert torch.isfinite(got).all(), name
        err = ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-9)).item()
        assert err < tol, (name, (b, h, w, d, k, dtype, out_bdl, strided, backend), err)


def test_torch_path_is_ss2ds_former_expression_in_both_layouts():
    x, wt = _inputs(2, 5, 5, 6, 3, torch.float32, "cpu", strided=True)
    conv = lambda t: F.conv2d(t, wt, padding=1, groups=6)  # noqa: E731
    torch.testing.assert_close(dwconv_silu(x, wt, out_bdl=True), F.silu(conv(x.permute(0, 3, 1, 2).contiguous())),
                               rtol=0, atol=0)
    former = F.silu(conv(x.contiguous().permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
    torch.testing.assert_close(dwconv_silu(x, wt, out_bdl=False), former, rtol=0, atol=0)
    assert dwconv_silu(x, wt, backend="auto").equal(dwconv_silu_reference(x, wt))
    assert CONV_BACKENDS == ("auto", "torch", "triton", "triton_tiles")
    with pytest.raises(ValueError, match="unknown conv backend"):
        dwconv_silu(x, wt, backend="cudnn")


def test_conv_backend_keeps_the_state_dict_and_auto_is_triton_on_cuda(monkeypatch):
    import dataclasses
    import importlib
    from types import SimpleNamespace

    from lamamba_dist.config import ModelConfig

    a, b = SS2D(16, resolution=8), SS2D(16, resolution=8, conv_backend="triton")
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    field = {f.name: f for f in dataclasses.fields(ModelConfig)}["conv_backend"]
    assert tuple(field.metadata["choices"]) == CONV_BACKENDS and ModelConfig().conv_backend == "auto"
    # "auto" takes the Triton kernel for a CUDA tensor where triton imports, PyTorch's path otherwise
    mod = importlib.import_module("lamamba_dist.ops.dwconv")
    calls = []
    monkeypatch.setattr(mod, "_DWCONV_TRITON", SimpleNamespace(dwconv_silu_triton=lambda *a: calls.append(a) or "triton"))
    monkeypatch.setattr(mod, "dwconv_silu_reference", lambda *a: "torch")
    cuda_x, cpu_x = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert dwconv_silu(cuda_x, None, backend="auto") == "triton" and len(calls) == 1
    assert dwconv_silu(cpu_x, None, backend="auto") == "torch"
    assert dwconv_silu(cuda_x, None, backend="torch") == "torch"
    monkeypatch.setattr(mod, "_DWCONV_TRITON", None)
    assert dwconv_silu(cuda_x, None, backend="auto") == "torch"


def test_triton_backend_without_triton_is_an_error(monkeypatch):
    import importlib

    mod = importlib.import_module("lamamba_dist.ops.dwconv")
    monkeypatch.setattr(mod, "_DWCONV_TRITON", None)
    for backend in ("triton", "triton_tiles"):
        with pytest.raises(RuntimeError, match="needs triton"):
            SS2D(8, resolution=4, conv_backend=backend)(torch.randn(1, 4, 4, 8))


# ----------------------------------------------------------------------------- CPU (Triton's interpreter)


def _ss2d_pair(dim, n, scan_backend="reference"):
    torch.manual_seed(0)
    ref = SS2D(dim, resolution=n, scan_backend=scan_backend, conv_backend="torch")
    ref.reset_ssm_parameters()
    fast = copy.deepcopy(ref)
    fast.conv_backend = "triton"
    return fast, ref


def _interpreter_cases():
    from lamamba_dist.ops import dwconv_triton as dt

    f32, bf16 = torch.float32, torch.bfloat16
    with nan_poisoned_empty():
        # "triton": the rows channels-last (K 3), else the tiles; "triton_tiles": the tiles
        for out_bdl, backend in itertools.product((True, False), ("triton", "triton_tiles")):
            _check(2, 4, 4, 5, 3, f32, "cpu", out_bdl, backend=backend)  # 16 pixels, 5 of 32 channels
            # 81 pixels: 2 pixel blocks; 2 channel blocks (tiles); rows: 40 of 128 channels
            _check(1, 9, 9, 40, 3, f32, "cpu", out_bdl, strided=True, backend=backend)
            _check(1, 3, 5, 3, 5, f32, "cpu", out_bdl, backend=backend)  # K 5 (tiles) wider than the map, not square
            _check(2, 8, 8, 8, 3, bf16, "cpu", out_bdl, tol=2e-2, backend=backend)
            _check(1, 1, 1, 3, 3, f32, "cpu", out_bdl, backend=backend)  # one pixel: every tap but the centre outside
        # channels not adjacent in memory (an NCHW tensor seen as NHWC): copied, then the same function
        xn = torch.randn(2, 5, 6, 6, generator=torch.Generator().manual_seed(2)).permute(0, 2, 3, 1).requires_grad_()
        wn = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(3)).requires_grad_()
        got = dt.dwconv_silu_triton(xn, wn)
        want = _f64(xn.detach(), wn.detach(), True)
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5
        gx, gw = torch.autograd.grad(got.square().sum(), [xn, wn])
        assert gx.shape == xn.shape and torch.isfinite(gx).all() and torch.isfinite(gw).all()
        # deterministic: bitwise equal runs
        x, wt = _inputs(2, 9, 9, 33, 3, f32, "cpu", seed=4)
        runs = []
        for _ in range(2):
            out = dt.dwconv_silu_triton(x, wt)
            runs.append([out, *torch.autograd.grad(out.square().sum(), [x, wt])])
        assert all(torch.equal(a, b) for a, b in zip(*runs))
        # SS2D with conv_backend "triton" == "torch", both SS2D layouts
        u = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(5))
        for scan in ("reference", "ss2d_reference"):
            fast, ref = _ss2d_pair(8, 8, scan)
            out_r, g_r = ss2d_run(ref, u)
            out_f, g_f = ss2d_run(fast, u)
            torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-6)
            for name, g in g_r.items():
                err = ((g_f[name] - g).abs().max() / g.abs().max().clamp(min=1e-6)).item()
                assert err < 1e-4, (scan, name, err)
        # dynamo + AOTAutograd trace through the custom ops with no graph break
        assert_compiles_like_eager(_ss2d_pair(8, 8)[0], u)
        _launch_config_cases()
    print("interpreter cases passed")


def _launch_config_cases():
    """Other launch configurations (tiles smaller and larger than the map, a single warp) and a bf16 intermediate
    gradient compute the same function (the kernels bench's sweep times them)."""
    from lamamba_dist.ops import dwconv_triton as dt

    x, wt = _inputs(2, 9, 9, 40, 3, torch.float32, "cpu", seed=6, strided=True)
    x, wt = x.detach(), wt.detach()
    gy = torch.randn(2, 40, 9, 9, generator=torch.Generator().manual_seed(7))
    x64 = x.double().requires_grad_()
    w64 = wt.double().requires_grad_()
    ref = _f64(x64, w64, True)
    rgx, rgw = torch.autograd.grad(ref, [x64, w64], gy.double())
    for cfg in ((16, 16, 1), (128, 64, 8)):  # the tiles
        out = dt.dwconv_silu_fwd_launch(x, wt, True, config=cfg, algo="tiles")
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        for in_gx in (False, True):  # the weight gradient's partial sums in either backward kernel
            gx, gw = dt.dwconv_silu_bwd_launch(x, wt, gy, True, gs_config=cfg, gx_config=cfg, gw_in_gx=in_gx,
                                               algo="tiles")
            torch.testing.assert_close(gx.double(), rgx, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gw.double(), rgw, rtol=1e-5, atol=1e-5)
    # the gx kernel's tile differing from the gs kernel's, K 5 on a map narrower than the kernel
    x5, w5 = _inputs(1, 3, 5, 3, 5, torch.float32, "cpu", seed=8)
    x5, w5 = x5.detach().double().requires_grad_(), w5.detach().double().requires_grad_()
    gy5 = torch.randn(1, 3, 3, 5, generator=torch.Generator().manual_seed(9)).double()
    r5 = torch.autograd.grad(_f64(x5, w5, True), [x5, w5], gy5)
    got5 = dt.dwconv_silu_bwd_launch(x5.detach().float(), w5.detach().float(), gy5.float(), True,
                                     gs_config=(16, 16, 1), gx_config=(8, 32, 2), gw_in_gx=True)
    for got, want in zip(got5, r5):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for in_gx, algo in ((False, "tiles"), (True, "tiles"), (False, "rows")):  # gs in bf16
        gx, gw = dt.dwconv_silu_bwd_launch(x, wt, gy, True, gs_dtype=torch.bfloat16, gw_in_gx=in_gx, algo=algo)
        for got, want in ((gx, rgx), (gw, rgw)):
            assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-2
    with pytest.raises(ValueError, match="power of two"):
        dt.dwconv_silu_fwd_launch(x, wt, True, config=(48, 32, 4), algo="tiles")
    _row_config_cases(x, wt, gy, ref, rgx, rgw)


def _row_config_cases(x, wt, gy, ref, rgx, rgw):
    """The row kernels (channels, rows, warps per program): blocks of channels smaller and larger than D, programs
    of one row, of rows that do not divide the map's 9 and of more rows than it has, several warps; the forward,
    gs and gx kernels on different configurations; channels-last output and gradient. The tiles and the rows agree
    to fp32 rounding."""
    from lamamba_dist.ops import dwconv_triton as dt

    for cfg in ((16, 1, 1), (32, 4, 1), (64, 16, 2), (128, 2, 4)):
        out = dt.dwconv_silu_fwd_launch(x, wt, True, config=cfg, algo="rows")
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        gx, gw = dt.dwconv_silu_bwd_launch(x, wt, gy, True, gs_config=cfg, gx_config=(32, 3, 1), algo="rows")
        torch.testing.assert_close(gx.double(), rgx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw.double(), rgw, rtol=1e-5, atol=1e-5)
    gy_cl = gy.permute(0, 2, 3, 1).contiguous()
    rows = dt.dwconv_silu_fwd_launch(x, wt, False, algo="rows"), *dt.dwconv_silu_bwd_launch(x, wt, gy_cl, False,
                                                                                           algo="rows")
    tiles = dt.dwconv_silu_fwd_launch(x, wt, False, algo="tiles"), *dt.dwconv_silu_bwd_launch(x, wt, gy_cl, False,
                                                                                             algo="tiles")
    for a, b in zip(rows, tiles):  # y, gx, gw: gw sums 162 products per tap in another order
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-6
    torch.testing.assert_close(rows[0].permute(0, 3, 1, 2).double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for bad, match in (((48, 1, 1), "power of two"), ((32, 0, 1), "at least 1"), ((32, 1, 3), "power of two")):
        with pytest.raises(ValueError, match=match):
            dt.dwconv_silu_fwd_launch(x, wt, True, config=bad, algo="rows")
    with pytest.raises(ValueError, match="gw_in_gx is for the tiles"):
        dt.dwconv_silu_bwd_launch(x, wt, gy, True, gw_in_gx=True, algo="rows")
    with pytest.raises(ValueError, match="unknown algo"):
        dt.dwconv_silu_triton(x, wt, True, algo="columns")
    # "auto" (conv_backend "triton"): the rows for K = 3 with channels-last output, the tiles otherwise
    assert dt.ALGO == "auto"
    assert [dt._use_rows(k, algo, bdl) for k, algo, bdl in (
        (3, "auto", False), (3, "auto", True), (5, "auto", False), (3, "rows", True), (5, "rows", False),
        (3, "tiles", False))] == [True, False, False, True, False, False]


@needs_triton
def test_dwconv_triton_under_interpreter_on_cpu():
    run_interpreter_cases(__file__)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("out_bdl", [True, False])
@pytest.mark.parametrize("algo", ["auto", "tiles", "tiles_gw_in_gx"])  # auto: the rows channels-last
def test_dwconv_triton_matches_float64_on_gpu(dtype, tol, out_bdl, algo, monkeypatch):
    from lamamba_dist.ops import dwconv_triton as dt

    # the tiles' weight gradient in either backward kernel
    monkeypatch.setattr(dt, "GW_IN_GX", algo == "tiles_gw_in_gx")
    backend = "triton" if algo == "auto" else "triton_tiles"
    for b, n, d in ((4, 32, 640), (4, 16, 1280), (8, 8, 2560), (2, 7, 100), (2, 64, 640)):
        _check(b, n, n, d, 3, dtype, "cuda", out_bdl, strided=True, tol=tol, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_tiles"])
def test_lamamba_with_triton_conv_matches_the_reference_model(backend):
    assert_models_match(*fast_and_reference_debug_models(conv_backend=backend), torch.bfloat16)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (the test sets it)"
    _interpreter_cases()
