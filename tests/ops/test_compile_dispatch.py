"""torch.compile traces the real scan dispatch with ``fullgraph=True`` (no graph break), on the CPU.

On a GPU, SS2D with mamba-ssm installed runs ``scan_kernel`` -> ``ss2d_core`` (its custom ops
``lamamba::ss2d_core_fwd/bwd``) -> the ``fused`` kernel pair -> the custom ops ``lamamba::selective_scan_fwd/bwd``. CPU CI has no mamba-ssm, so the kernel module behind those
custom ops is replaced by one that computes the literal recurrence (same signature and outputs as mamba-ssm's
``selective_scan_cuda``): everything above it (the dispatch, the lean-backward core, the op registration) is
the code the GPU runs. Any Python the tracer refuses in that path (an import inside a traced function, for
example) fails this test under ``fullgraph=True``.
"""

import importlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lamamba_dist.models.lamamba import SS2D

ss = importlib.import_module("lamamba_dist.ops.selective_scan")


class _ReferenceKernelModule:
    """Stands in for mamba-ssm's ``selective_scan_cuda`` module: fwd/bwd with its signatures."""

    @staticmethod
    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        out = ss.selective_scan_reference(u, delta, A, B, C, D, delta_bias, delta_softplus)
        batch, dim, length = u.shape
        states = u.new_zeros(batch, dim, ss._n_chunks(length), A.shape[1] * 2, dtype=A.dtype)
        return out, states

    @staticmethod
    def bwd(u, delta, A, B, C, D, z, delta_bias, dout, states, dz, out_z, delta_softplus, recompute_out_z):
        def grads():  # autograd of the recurrence (a custom op's body runs with autograd's dispatch key excluded
            with torch.enable_grad():  # in this thread's state, so it runs in a fresh thread)
                ins = [t.detach().requires_grad_(True) for t in (u, delta, A, B, C, D, delta_bias)]
                out = ss.selective_scan_reference(*ins, delta_softplus=delta_softplus)
                return torch.autograd.grad(out, ins, dout)

        with ThreadPoolExecutor(1) as pool:
            du, ddelta, dA, dB, dC, dD, dbias = pool.submit(grads).result()
        return du, ddelta, dA, dB.float(), dC.float(), dD, dbias


def _ss2d(backend: str) -> SS2D:
    torch.manual_seed(0)
    m = SS2D(dim=8, d_state=1, scan_backend=backend, resolution=4)
    for p in m.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
        else:
            torch.nn.init.uniform_(p, -0.5, 0.5)
    with torch.no_grad():
        m.A_logs.zero_()
    return m


def _run(model, fn, u):
    model.zero_grad(set_to_none=True)
    u = u.clone().requires_grad_(True)
    out = fn(u)
    out.square().sum().backward()
    return out.detach(), u.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("lean", [True, False])
def test_fused_scan_dispatch_compiles_fullgraph_on_cpu(monkeypatch, lean):
    monkeypatch.setattr(ss, "_SCAN_CUDA", _ReferenceKernelModule())
    assert ss.scan_kernel("fused", torch.zeros(1, 1, 1), 1) == "fused"
    torch._dynamo.reset()
    model = _ss2d("fused")
    model.lean_scan_backward = lean
    u = torch.randn(2, 4, 4, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = _run(model, compiled, u)
    ref_model = _ss2d("reference")
    ref_model.load_state_dict(model.state_dict())
    ref = _run(ref_model, ref_model, u)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-5)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-4, atol=1e-5, msg=n)
    torch._dynamo.reset()


def test_import_inside_the_traced_path_is_refused_under_fullgraph(monkeypatch):
    """The failure class this file guards against: an import in a traced function breaks the graph. (The lean
    core's kernel calls run inside its custom ops, which the tracer does not enter; the plain path's dispatch to
    mamba-ssm's op is traced.)"""
    monkeypatch.setattr(ss, "_SCAN_CUDA", _ReferenceKernelModule())
    fused = ss.selective_scan_fused

    def importing_fused(*a):
        mod = importlib.import_module("lamamba_dist.ops.selective_scan")
        assert mod is ss
        return fused(*a)

    monkeypatch.setattr(ss, "selective_scan_fused", importing_fused)
    torch._dynamo.reset()
    model = _ss2d("fused")
    model.lean_scan_backward = False
    with pytest.raises(Exception, match="import"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(torch.randn(2, 4, 4, 8))
    torch._dynamo.reset()


def test_mixed_backend_picks_the_kernel_by_sequence_length(monkeypatch):
    """"mixed" (= "auto"): Triton's d_state-1 kernel up to MIXED_TRITON_MAX_LENGTH steps, mamba-ssm's above it, either one
    alone where the other is missing, the reference off CUDA; SS2D asks with its map's length."""
    from types import SimpleNamespace

    cuda = lambda length: SimpleNamespace(is_cuda=True, shape=(2, 8, length))  # noqa: E731
    limit = ss.MIXED_TRITON_MAX_LENGTH
    monkeypatch.setattr(ss, "_cuda_module", lambda: object())
    monkeypatch.setattr(ss, "_SCAN_TRITON", object())
    assert ss.scan_kernel("mixed", cuda(64), 1) == "triton"
    assert ss.scan_kernel("mixed", cuda(limit), 1) == "triton"
    assert ss.scan_kernel("mixed", cuda(limit + 1), 1) == "fused"
    assert ss.scan_kernel("mixed", cuda(8), 1, length=4096) == "fused"  # SS2D passes h * w
    assert ss.scan_kernel("mixed", cuda(64), 2) == "fused"  # the Triton kernel is d_state 1 only
    assert ss.scan_kernel("mixed", SimpleNamespace(is_cuda=False, shape=(2, 8, 64)), 1) == "reference"
    for backend in ("auto", "mixed"):  # "auto" is "mixed"; "fused" and "triton" force one kernel
        assert ss.scan_kernel(backend, cuda(64), 1) == "triton"
        assert ss.scan_kernel(backend, cuda(4096), 1) == "fused"
    assert ss.scan_kernel("fused", cuda(64), 1) == "fused"
    assert ss.scan_kernel("triton", cuda(4096), 1) == "triton"
    assert ss.scan_kernel("auto", SimpleNamespace(is_cuda=False, shape=(2, 8, 64)), 1) == "reference"
    monkeypatch.setattr(ss, "_cuda_module", lambda: None)
    assert ss.scan_kernel("mixed", cuda(4096), 1) == "triton"
    monkeypatch.setattr(ss, "_SCAN_TRITON", None)
    assert ss.scan_kernel("mixed", cuda(64), 1) == "reference"


def test_compile_modes_of_the_config_are_the_ones_compile_blocks_takes():
    import dataclasses

    from lamamba_dist.config import TrainConfig
    from lamamba_dist.models import create_model
    from lamamba_dist.models.compile import COMPILE_MODES, compile_blocks, uses_cudagraphs

    choices = {f.name: f for f in dataclasses.fields(TrainConfig)}["compile_mode"].metadata["choices"]
    assert tuple(choices) == COMPILE_MODES and TrainConfig().compile_mode == "default"
    assert [m for m in COMPILE_MODES if uses_cudagraphs(m)] == ["reduce-overhead", "max-autotune"]
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        compile_blocks(create_model("DiT-debug/2", resolution=32), mode="fast")
