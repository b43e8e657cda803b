"""The channels-last snake gather / merge (lamamba_dist/ops/cross_scan.py dispatch, ops/cross_scan_triton.py kernels).

* CPU, always: the torch paths equal the literal cross_scan_reference / cross_merge_reference with the layout
  change; each is the other's adjoint (<gather(x), y> = <x, merge(y)>); the dispatch runs torch off CUDA.
* CPU under Triton's interpreter (a subprocess running this file with TRITON_INTERPRET=1), skipped where triton is
  not installed: both kernels against the references on maps that fill no tile (sides 3, 5, 6, 12) and ones that
  do, channel counts that do not fill a block, bf16 and fp32, NaN-poisoned outputs, gradients through the custom
  ops (each the other's backward), launch configurations, errors; torch.compile(fullgraph=True) traces them.
* GPU (``-m gpu``): the same at LaMamba-XL's map sides and widths, bitwise for the gather.
"""

import importlib
import os

import pytest
import torch

from kernel_helpers import nan_poisoned_empty, needs_triton, run_interpreter_cases
from lamamba_dist.ops import cross_merge_reference, cross_scan_reference, snake_tables
from lamamba_dist.ops.cross_scan import gather_cl_reference, merge_cl_reference, snake_gather_cl, snake_merge_cl


def _literal_gather(x_cl, n):
    """(B, L, D) -> (B, 4, D, L) through the literal per-direction reference."""
    b, length, d = x_cl.shape
    return cross_scan_reference(x_cl.transpose(1, 2).reshape(b, d, n, n))


def _literal_merge(ys, n):
    return cross_merge_reference(ys, n).transpose(1, 2)


@pytest.mark.parametrize("n,d", [(1, 3), (3, 5), (4, 8), (6, 2)])
def test_torch_paths_equal_literal_references(n, d):
    paths, inverse = snake_tables(n)
    g = torch.Generator().manual_seed(n * 10 + d)
    x_cl = torch.randn(2, n * n, d, generator=g)
    ys = torch.randn(2, 4, d, n * n, generator=g)
    torch.testing.assert_close(gather_cl_reference(x_cl, paths), _literal_gather(x_cl, n), rtol=0, atol=0)
    torch.testing.assert_close(merge_cl_reference(ys, inverse), _literal_merge(ys, n), rtol=1e-6, atol=1e-6)
    # the CPU dispatch runs the torch paths, contiguous, the merge channels-last
    out = snake_merge_cl(ys, paths, inverse)
    assert out.shape == (2, n * n, d) and out.is_contiguous()
    assert snake_gather_cl(x_cl, paths, inverse).is_contiguous()


def ct_module():
    # the module by its full name: ``lamamba_dist.ops`` exports a function named cross_scan
    return importlib.import_module("lamamba_dist.ops.cross_scan")._CROSS_TRITON


def test_snake_backend_is_checked_and_auto_is_torch_off_cuda():
    n, d = 3, 4
    paths, inverse = snake_tables(n)
    x_cl, ys = torch.randn(2, n * n, d), torch.randn(2, 4, d, n * n)
    for fn, arg in ((snake_gather_cl, x_cl), (snake_merge_cl, ys)):
        with pytest.raises(ValueError, match="unknown snake backend 'cuda'"):
            fn(arg, paths, inverse, "cuda")
        torch.testing.assert_close(fn(arg, paths, inverse, "auto"), fn(arg, paths, inverse, "torch"), rtol=0, atol=0)
        if ct_module() is not None:  # the kernels are for CUDA tensors (CPU ones only under Triton's interpreter)
            with pytest.raises(ValueError, match="runs on CUDA tensors, got a cpu tensor"):
                fn(arg, paths, inverse, "triton")


def test_snake_backend_reaches_every_ss2d():
    from lamamba_dist.bench.model import parse_model_spec
    from lamamba_dist.config import ModelConfig, model_kwargs
    from lamamba_dist.models import create_model

    # [model] snake_backend -> create_model -> every SS2D
    model = create_model("LaMamba-debug", **model_kwargs(ModelConfig(resolution=64, snake_backend="triton")))
    ss2d = [m for m in model.modules() if hasattr(m, "snake_backend")]
    assert ss2d and all(m.snake_backend == "triton" for m in ss2d)
    assert model_kwargs(ModelConfig(name="LaMamba-debug"))["snake_backend"] == "auto"
    assert parse_model_spec("LaMamba-XL:snake=triton:compile=true") == ("LaMamba-XL", dict(snake_backend="triton",
                                                                                          compile_model=True))
    with pytest.raises(ValueError, match="snake='gpu'"):
        parse_model_spec("LaMamba-XL:snake=gpu")


def test_gather_and_merge_are_adjoint():
    n, d = 5, 7
    paths, inverse = snake_tables(n)
    g = torch.Generator().manual_seed(3)
    x_cl = torch.randn(3, n * n, d, generator=g, dtype=torch.float64)
    ys = torch.randn(3, 4, d, n * n, generator=g, dtype=torch.float64)
    lhs = (snake_gather_cl(x_cl, paths, inverse) * ys).sum()
    rhs = (x_cl * snake_merge_cl(ys, paths, inverse)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def _kernel_cases(device, shapes, dtypes):
    from lamamba_dist.ops import cross_scan_triton as ct

    for n, d in shapes:
        paths, inverse = snake_tables(n, device)
        for dtype in dtypes:
            g = torch.Generator().manual_seed(n + d)
            x_cl = torch.randn(2, n * n, d, generator=g).to(device, dtype)
            ys = torch.randn(2, 4, d, n * n, generator=g).to(device, dtype)
            with nan_poisoned_empty():
                xs = ct.gather_cl_launch(x_cl, paths)
                y = ct.merge_cl_launch(ys, inverse)
                # the merge's other tile layout ((channels, positions) or (positions, channels)) at the default tile
                side, bd, nw, transposed = ct.MERGE_CONFIG
                y_other = ct.merge_cl_launch(ys, inverse, (side, bd, nw, not transposed))
            assert xs.dtype == dtype and y.dtype == dtype and xs.is_contiguous() and y.is_contiguous()
            torch.testing.assert_close(xs, gather_cl_reference(x_cl, paths), rtol=0, atol=0)  # a copy: exact
            want = merge_cl_reference(ys.double(), inverse)  # the kernel sums in fp32, rounds once
            tol = 1e-6 if dtype == torch.float32 else 8e-3
            torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol, msg=f"merge {n} {d} {dtype}")
            torch.testing.assert_close(y_other.double(), want, rtol=tol, atol=tol, msg=f"other merge {n} {d} {dtype}")
            # non-contiguous input (a transposed view): read through a copy, same result
            xs2 = ct.gather_cl_launch(x_cl.transpose(1, 2).contiguous().transpose(1, 2), paths)
            torch.testing.assert_close(xs2, xs, rtol=0, atol=0)


def _interpreter_cases():
    from lamamba_dist.ops import cross_scan_triton as ct

    _kernel_cases("cpu", [(1, 3), (3, 5), (4, 64), (5, 70), (6, 2), (12, 9), (16, 130)], [torch.float32, torch.bfloat16])
    # other launch configurations give the same result
    n, d = 12, 40
    paths, inverse = snake_tables(n)
    x_cl = torch.randn(2, n * n, d)
    ys = torch.randn(2, 4, d, n * n)
    for cfg in ((16, 16, 1), (128, 32, 2)):
        torch.testing.assert_close(ct.gather_cl_launch(x_cl, paths, cfg), gather_cl_reference(x_cl, paths), rtol=0, atol=0)
    for cfg in ((4, 16, 1), (16, 8, 2), (4, 16, 1, True), (16, 8, 2, True)):
        torch.testing.assert_close(ct.merge_cl_launch(ys, inverse, cfg), merge_cl_reference(ys, inverse),
                                   rtol=1e-6, atol=1e-6)
    # the custom ops' gradients: each the other's adjoint
    xg = x_cl.double().requires_grad_()
    yg = ys.double().requires_grad_()
    out_g = ct.gather_cl(xg, paths, inverse)
    out_m = ct.merge_cl(yg, paths, inverse)
    wg, wm = torch.randn_like(out_g), torch.randn_like(out_m)
    (out_g * wg).sum().backward()
    (out_m * wm).sum().backward()
    torch.testing.assert_close(xg.grad, merge_cl_reference(wg, inverse), rtol=1e-6, atol=1e-6)  # summed in fp32
    torch.testing.assert_close(yg.grad, gather_cl_reference(wm, paths), rtol=1e-12, atol=1e-12)
    # torch.compile traces both custom ops without a graph break
    fn = torch.compile(lambda a, b: (ct.gather_cl(a, paths, inverse), ct.merge_cl(b, paths, inverse)),
                       backend="aot_eager", fullgraph=True)
    got = fn(x_cl, ys)
    torch.testing.assert_close(got[0], gather_cl_reference(x_cl, paths), rtol=0, atol=0)
    torch.testing.assert_close(got[1], merge_cl_reference(ys, inverse), rtol=1e-6, atol=1e-6)
    # bad input: named
    for call, match in ((lambda: ct.gather_cl_launch(x_cl[0], paths), "must be \\(B, L, D\\)"),
                        (lambda: ct.gather_cl_launch(x_cl, paths[:, :10]), "snake table must be"),
                        (lambda: ct.merge_cl_launch(ys[:, :3], inverse), "must be \\(B, 4, D, L\\)"),
                        (lambda: ct.merge_cl_launch(torch.randn(1, 4, 2, 8), inverse[:, :8]), "not a square"),
                        (lambda: ct.gather_cl_launch(x_cl, paths, (48, 16, 1)), "power of two")):
        with pytest.raises(ValueError, match=match):
            call()
    # SS2D's scan core with the snake backend "triton" (the reference scan): the torch backend's output and gradients
    from lamamba_dist.ops.ss2d_core import ss2d_core

    b, d, r, n = 2, 6, 3, 5
    paths, inverse = snake_tables(n)
    g = torch.Generator().manual_seed(11)
    ins = [torch.randn(b, d, n * n, generator=g), torch.randn(4, r + 2, d, generator=g) * 0.3,
           torch.randn(4, d, r, generator=g) * 0.3, -torch.rand(4 * d, 1, generator=g) - 0.5,
           torch.randn(4 * d, generator=g), torch.randn(4 * d, generator=g) * 0.1]
    outs = {}
    for snake in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in ins]
        y = ss2d_core(*leaves, paths, inverse, "reference", snake)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
        (y * w).sum().backward()
        outs[snake] = [y.detach()] + [t.grad for t in leaves]
    for got, want in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("interpreter cases passed")


@needs_triton
def test_kernels_under_interpreter_on_cpu():
    run_interpreter_cases(__file__)


@pytest.mark.gpu
def test_kernels_on_gpu_at_lamamba_xl_shapes():
    # LaMamba-XL's SS2D maps at 256 and 512 px: (side, D = 2 C)
    _kernel_cases("cuda", [(64, 640), (32, 640), (32, 1280), (16, 2560), (8, 2560), (4, 2560), (6, 40)],
                  [torch.bfloat16, torch.float32])
    # through the custom ops (what ss2d_core calls with the snake backend "triton")
    from lamamba_dist.ops import cross_scan_triton as ct

    paths, inverse = snake_tables(32, "cuda")
    x_cl = torch.randn(4, 1024, 640, device="cuda", dtype=torch.bfloat16)
    ys = torch.randn(4, 4, 640, 1024, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(ct.gather_cl(x_cl, paths, inverse), gather_cl_reference(x_cl, paths), rtol=0, atol=0)
    torch.testing.assert_close(ct.merge_cl(ys, paths, inverse).float(), merge_cl_reference(ys.float(), inverse),
                               rtol=8e-3, atol=8e-3)
    # "auto" runs the kernels on CUDA tensors: the same results as "triton", bit for bit
    torch.testing.assert_close(snake_gather_cl(x_cl, paths, inverse, "auto"), ct.gather_cl(x_cl, paths, inverse),
                               rtol=0, atol=0)
    torch.testing.assert_close(snake_merge_cl(ys, paths, inverse, "auto"), ct.merge_cl(ys, paths, inverse),
                               rtol=0, atol=0)
    assert importlib.import_module("lamamba_dist.ops.cross_scan")._use_triton("auto", x_cl)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (the test sets it)"
    _interpreter_cases()
