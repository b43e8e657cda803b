"""GPU-only checks of the whole model: fused vs reference paths, and torch.compile through the fused scan."""

import pytest
import torch

from kernel_helpers import assert_models_match

from lamamba_dist.models import create_model
from lamamba_dist.ops import fused_available

pytestmark = pytest.mark.gpu


def _pair(dtype, resolution=128, fast_kw=None, **kw):
    """The model on its fast paths (kw, then fast_kw: its own kernel choices) and a reference-kernel copy of it."""
    torch.manual_seed(0)
    fast = create_model("LaMamba-debug", resolution=resolution, num_classes=10, class_dropout=0.0,
                        **kw, **(fast_kw or {})).cuda()
    with torch.no_grad():
        for p in fast.parameters():  # leave adaLN-Zero so every branch contributes
            p.add_(torch.randn_like(p) * 0.02)
    ref = create_model("LaMamba-debug", resolution=resolution, num_classes=10, class_dropout=0.0,
                       scan_backend="reference", attn_backend="reference", **kw).cuda()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_model_matches_reference_model(dtype):
    if not fused_available():
        pytest.skip("mamba-ssm's selective_scan_cuda is not installed")
    fast, ref = _pair(dtype)
    assert_models_match(fast, ref, dtype)


def test_mixed_scan_backend_model_matches_reference_model(monkeypatch):
    """scan_backend "mixed" with both kernels in one model: mamba-ssm's for the 16x16 maps, Triton's for the
    smaller ones (the limit lowered to 64 steps for LaMamba-debug's maps)."""
    import importlib

    if not fused_available():
        pytest.skip("mamba-ssm's selective_scan_cuda is not installed")
    ss = importlib.import_module("lamamba_dist.ops.selective_scan")
    monkeypatch.setattr(ss, "MIXED_TRITON_MAX_LENGTH", 64)
    fast, ref = _pair(torch.bfloat16, fast_kw={"scan_backend": "mixed"})
    lengths = {m.scan_paths.shape[-1] for m in fast.modules() if type(m).__name__ == "SS2D"}
    kernels = {n: ss.scan_kernel("mixed", torch.zeros(1, device="cuda"), 1, length=n) for n in lengths}
    assert set(kernels.values()) == {"fused", "triton"}, kernels
    assert_models_match(fast, ref, torch.bfloat16)


def test_compile_traces_through_fused_scan_without_graph_break():
    if not fused_available():
        pytest.skip("mamba-ssm's selective_scan_cuda is not installed")
    from lamamba_dist.models.lamamba import SS2D

    torch.manual_seed(0)
    op = SS2D(64).cuda()
    op.reset_ssm_parameters()
    op = op.cuda()
    x = torch.randn(2, 16, 16, 64, device="cuda", requires_grad=True)
    eager = op(x)
    compiled = torch.compile(op, fullgraph=True)  # raises on any graph break
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_whole_model_compiles_and_matches_eager():
    if not fused_available():
        pytest.skip("mamba-ssm's selective_scan_cuda is not installed")
    fast, _ = _pair(torch.float32, resolution=64)
    x = torch.randn(2, 4, 8, 8, device="cuda")
    t = torch.tensor([5, 600], device="cuda")
    y = torch.tensor([1, 2], device="cuda")
    eager = fast(x, t, y)
    compiled = torch.compile(fast)(x, t, y)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
