"""SS2D's fused snake scan for short sequences (lamamba_dist/ops/snake_scan_triton.py) and its place in ss2d_core.

* CPU under Triton's interpreter (a subprocess running this file with TRITON_INTERPRET=1), skipped where triton is
  not installed: forward and every gradient against the unfused path in float64 (gather, the literal recurrence,
  merge) on maps whose length fills no power of two (3x3, 5x5) and ones that do (4x4, 8x8), channel counts that do
  not fill a program's block, fp32 and bf16, NaN-poisoned outputs, launch configurations, the deltas' gradient
  written over the deltas, errors; ss2d_core with the fused kernels equals it with them switched off.
* GPU (``-m gpu``): the same at LaMamba-XL's 8x8 stage (batch 8, d_inner 2560) and the model's SS2D.
"""

import os

import pytest
import torch

from kernel_helpers import (assert_models_match, fast_and_reference_debug_models, nan_poisoned_empty, needs_triton,
                            run_interpreter_cases)
from lamamba_dist.ops import snake_tables


def _inputs(b, n, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    length, k = n * n, 4
    x = torch.randn(b, length, d, generator=g)
    delta = torch.randn(b, k * d, length, generator=g) * 0.5 - 1.0
    bs = torch.randn(b, k, 1, length, generator=g)
    cs = torch.randn(b, k, 1, length, generator=g)
    a = -torch.rand(k * d, 1, generator=g) * 2 - 0.1
    dv = torch.randn(k * d, generator=g)
    bias = torch.randn(k * d, generator=g) * 0.3
    ins = [t.to(device, dtype) for t in (x, delta, bs, cs)] + [t.to(device) for t in (a, dv, bias)]
    return ins


def _unfused(x, delta, bs, cs, a, dv, bias, paths, inverse):
    """The same function through the unfused path's pieces: gather, the literal recurrence, merge (float64)."""
    from lamamba_dist.ops.cross_scan import gather_cl_reference, merge_cl_reference
    from lamamba_dist.ops.selective_scan import selective_scan_reference

    b, length, d = x.shape
    xs = gather_cl_reference(x, paths).reshape(b, 4 * d, length)
    ys = selective_scan_reference(xs.double(), delta.double(), a.double(), bs.double(), cs.double(), dv.double(),
                                  bias.double(), delta_softplus=True)
    return merge_cl_reference(ys.double().view(b, 4, d, length), inverse)


def _check(b, n, d, dtype, device, tol, **launch):
    from lamamba_dist.ops import snake_scan_triton as sst

    paths, inverse = snake_tables(n, device)
    ins = _inputs(b, n, d, dtype, device, seed=n * 100 + d)
    gy = torch.randn(b, n * n, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with nan_poisoned_empty():
        y = sst.snake_scan_fwd(*ins, paths, inverse, **launch)
        grads = sst.snake_scan_bwd(*ins, paths, inverse, gy, **launch)
    leaves = [t.detach().double().requires_grad_() for t in ins]
    want = _unfused(*leaves, paths, inverse)
    wgrads = torch.autograd.grad(want, leaves, gy.double())
    assert y.dtype == dtype and y.shape == (b, n * n, d)
    gx, gdelta, ga, gb, gc, gd, gbias = grads  # the scan kernels' order: u, delta, A, B, C, D, bias
    got_by_input = (gx, gdelta, gb, gc, ga, gd, gbias)  # the inputs' order
    for name, got, ref, inp in [("y", y, want, ins[0])] + list(zip("x delta B C A D bias".split(), got_by_input,
                                                                       wgrads, ins)):
        assert got.shape == ref.shape and got.dtype == inp.dtype, name
        assert torch.isfinite(got).all(), name
        err = ((got.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()
        assert err < tol, (name, n, d, dtype, launch, err)
    return ins, gy, grads


# ----------------------------------------------------------------------------- CPU (Triton's interpreter)


def _interpreter_cases():
    from lamamba_dist.ops import snake_scan_triton as sst

    f32, bf16 = torch.float32, torch.bfloat16
    _check(2, 3, 5, f32, "cpu", 1e-5)  # L 9 in a 16-step tile, 5 of 32 channels
    _check(1, 4, 40, f32, "cpu", 1e-5)  # L 16: two channel blocks, the second partly masked
    _check(2, 5, 8, f32, "cpu", 1e-5, sub_d=4, num_warps=1)  # L 25, two 4-channel blocks
    _check(1, 8, 16, f32, "cpu", 1e-5, sub_d=16, num_warps=2, stages=1)  # L 64 (LaMamba-XL's 8x8 stage)
    _check(1, 8, 16, f32, "cpu", 1e-5, sub_d=8, num_warps=4, stages=3)  # the directions' loop pipelined
    _check(1, 8, 16, bf16, "cpu", 3e-2)
    # the deltas' gradient written over the deltas: bitwise the same as into a fresh tensor
    paths, inverse = snake_tables(4)
    ins = _inputs(2, 4, 16, f32, "cpu", seed=3)
    gy = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(4))
    fresh = sst.snake_scan_bwd(*ins, paths, inverse, gy)
    delta = ins[1].clone()
    ins[1] = delta
    aliased = sst.snake_scan_bwd(*ins, paths, inverse, gy, gdelta=delta)
    assert aliased[1].data_ptr() == delta.data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(fresh, aliased))
    # deterministic
    again = sst.snake_scan_bwd(*_inputs(2, 4, 16, f32, "cpu", seed=3), paths, inverse, gy)
    assert all(torch.equal(a, b) for a, b in zip(fresh, again))
    with pytest.raises(ValueError, match="delta must be"):
        sst.snake_scan_fwd(ins[0], ins[1][:, :4], *ins[2:], paths, inverse)
    with pytest.raises(ValueError, match="power of two"):
        sst.snake_scan_fwd(*ins, paths, inverse, sub_d=12)
    with pytest.raises(ValueError, match="stages must be"):
        sst.snake_scan_bwd(*ins, paths, inverse, gy, stages=-1)
    _core_cases()
    print("interpreter cases passed")


def _core_cases(b=2, n=4, d=24, r=3, device="cpu", dtype=torch.float32, tol=1e-5):
    """ss2d_core (the op core's functions) with the fused kernels equals ss2d_core with them switched off."""
    from lamamba_dist.ops import snake_scan_triton as sst
    from lamamba_dist.ops.ss2d_core import _core_backward, _core_forward

    torch.manual_seed(0)
    k, length = 4, n * n
    paths, inverse = snake_tables(n, device)
    x = torch.randn(b, length, d).to(device, dtype)
    wx = torch.randn(k, r + 2, d).to(device, dtype) * 0.3
    wdt = torch.randn(k, d, r).to(device, dtype) * 0.3
    a = -torch.rand(k * d, 1, device=device) - 0.2
    ds = torch.randn(k * d, device=device)
    bias = torch.randn(k * d, device=device) * 0.2
    gy = torch.randn(b, length, d).to(device, dtype)
    outs = {}
    # (both ways, forward only): unfused, fused, the fused forward with the unfused backward (zero entry states)
    for limits in ((0, 0), (64, 0), (0, 64)):
        old = sst.MAX_LENGTH, sst.FWD_MAX_LENGTH
        sst.MAX_LENGTH, sst.FWD_MAX_LENGTH = limits
        try:
            with nan_poisoned_empty():
                y, dts_r, bs, cs, states = _core_forward(x, wx, wdt, a, ds, bias, paths, inverse, "triton", "fused",
                                                         True)
                grads = _core_backward(gy, x, wx, wdt, dts_r, bs, cs, a, ds, bias, states, paths, inverse, "triton",
                                       "fused", True)
        finally:
            sst.MAX_LENGTH, sst.FWD_MAX_LENGTH = old
        outs[limits] = (y, *grads)
    for limits in ((64, 0), (0, 64)):
        for name, got, want in zip("y x wx wdt A D bias".split(), outs[limits], outs[(0, 0)]):
            err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-12)).item()
            assert err < tol, (limits, name, err)


@needs_triton
def test_snake_scan_under_interpreter_on_cpu():
    run_interpreter_cases(__file__)


def test_eligibility_follows_max_length(monkeypatch):
    sst = pytest.importorskip("lamamba_dist.ops.snake_scan_triton")
    monkeypatch.setattr(sst, "MAX_LENGTH", 64)
    monkeypatch.setattr(sst, "FWD_MAX_LENGTH", 0)
    assert sst.eligible(64) and sst.eligible(9) and not sst.eligible(256) and not sst.eligible(64, d_state=2)
    assert sst.eligible(64, forward=True) and not sst.eligible(256, forward=True)
    monkeypatch.setattr(sst, "MAX_LENGTH", 0)
    assert not sst.eligible(64) and not sst.eligible(64, forward=True)
    monkeypatch.setattr(sst, "FWD_MAX_LENGTH", 256)  # the fused forward alone
    assert not sst.eligible(64) and sst.eligible(64, forward=True) and sst.eligible(256, forward=True)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_snake_scan_matches_float64_on_gpu(dtype, tol):
    for b, n, d, launch in ((8, 8, 2560, {}), (2, 8, 640, dict(sub_d=32, num_warps=4, stages=2)), (3, 5, 100, {}),
                            (2, 16, 256, dict(sub_d=16, num_warps=8, stages=3))):
        _check(b, n, d, dtype, "cuda", tol, **launch)


@pytest.mark.gpu
def test_core_with_fused_kernels_matches_unfused_on_gpu():
    # LaMamba-XL's 8x8 stage (d_inner 2560, rank 80) at batch 4: both ways fused, the fused forward alone
    _core_cases(b=4, n=8, d=2560, r=80, device="cuda", dtype=torch.float32, tol=1e-4)
    _core_cases(b=4, n=8, d=2560, r=80, device="cuda", dtype=torch.bfloat16, tol=3e-2)


@pytest.mark.gpu
def test_lamamba_with_fused_snake_matches_the_reference_model():
    assert_models_match(*fast_and_reference_debug_models(snake_backend="fused"), torch.bfloat16)


def test_fused_snake_reaches_every_ss2d():
    from lamamba_dist.bench.model import parse_model_spec
    from lamamba_dist.config import ModelConfig, model_kwargs
    from lamamba_dist.models import create_model

    model = create_model("LaMamba-debug", **model_kwargs(ModelConfig(resolution=64, snake_backend="fused")))
    ss2d = [m for m in model.modules() if hasattr(m, "snake_backend")]
    assert ss2d and all(m.snake_backend == "fused" for m in ss2d)
    assert parse_model_spec("LaMamba-XL:snake=fused")[1] == dict(snake_backend="fused")


@pytest.mark.gpu
def test_snake_scan_writes_gdelta_over_delta_on_gpu():
    from lamamba_dist.ops import snake_scan_triton as sst

    paths, inverse = snake_tables(8, "cuda")
    ins = _inputs(4, 8, 640, torch.bfloat16, "cuda", seed=5)
    gy = torch.randn(4, 64, 640, device="cuda", dtype=torch.bfloat16)
    fresh = sst.snake_scan_bwd(*ins, paths, inverse, gy)
    ins[1] = ins[1].clone()
    aliased = sst.snake_scan_bwd(*ins, paths, inverse, gy, gdelta=ins[1])
    assert all(torch.equal(a, b) for a, b in zip(fresh, aliased))


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (the test sets it)"
    _interpreter_cases()
