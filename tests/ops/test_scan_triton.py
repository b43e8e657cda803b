"""The Triton selective scan for d_state 1 (lamamba_dist/ops/scan_triton.py) against a float64 restatement of
the recurrence: forward and all seven gradients.

* GPU tests (``-m gpu``): fp32 and bf16, L in {64, 1024, 4096}, the chunked-L path, softplus pass-through,
  determinism, dispatch, and torch.compile(fullgraph=True) through the custom ops.
* A CPU test that runs the same kernels under Triton's interpreter (TRITON_INTERPRET=1, which must be set
  before triton's jit decorators run, hence a subprocess running this file), skipped where triton is not
  installed (the dev extra installs it, so CI runs it). Outputs are poisoned with NaN first to prove every element is written.
"""

import importlib
import os

import pytest
import torch

from kernel_helpers import nan_poisoned_empty, needs_triton, run_interpreter_cases
from lamamba_dist.ops.selective_scan import selective_scan, selective_scan_reference

NAMES = "u delta A B C D bias".split()


def _inputs(batch, groups, d, length, dtype, device, seed=0, bias_shift=-2.0):
    g = torch.Generator().manual_seed(seed)
    dim = groups * d
    mk = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    u = mk(batch, dim, length).to(device, dtype)
    delta = mk(batch, dim, length, scale=0.5).to(device, dtype)
    A = -torch.exp(mk(dim, 1, scale=0.5)).to(device)
    B = mk(batch, groups, 1, length).to(device, dtype)
    C = mk(batch, groups, 1, length).to(device, dtype)
    D = mk(dim).to(device)
    bias = (mk(dim, scale=0.5) + bias_shift).to(device)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, bias)]


def _scan64(u, delta, A, B, C, D, bias, delta_softplus=True):
    """h_s = exp(dt A) h_{s-1} + dt B u, y = C h + D u, in float64 (a loop over L, vectorised over rows)."""
    u, delta, A, B, C, D, bias = (t.double() for t in (u, delta, A, B, C, D, bias))
    batch, dim, length = u.shape
    rep = dim // B.shape[1]
    x = delta + bias[:, None]
    dt = torch.nn.functional.softplus(x) if delta_softplus else x
    Bf = B[:, :, 0].repeat_interleave(rep, dim=1)
    Cf = C[:, :, 0].repeat_interleave(rep, dim=1)
    a = torch.exp(dt * A)
    bu = dt * Bf * u
    h = u.new_zeros(batch, dim)
    ys = []
    for s in range(length):
        h = a[..., s] * h + bu[..., s]
        ys.append(h * Cf[..., s])
    return torch.stack(ys, -1) + D[:, None] * u


def _compare(args, out, grads, gy, delta_softplus=True, fwd_tol=1e-5, grad_tol=1e-5, label=""):
    """Relative max errors (scaled by the reference's max magnitude) of out and the 7 grads vs float64."""
    ref_args = [a.detach().double().requires_grad_() for a in args]
    ref = _scan64(*ref_args, delta_softplus=delta_softplus)
    ref_grads = torch.autograd.grad(ref, ref_args, gy.double())
    errs = {"y": ((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()}
    for name, a, arg, r in zip(NAMES, grads, args, ref_grads):
        assert a.dtype == arg.dtype and a.shape == arg.shape, (name, a.dtype, arg.dtype, a.shape, arg.shape)
        assert torch.isfinite(a).all(), name
        errs[name] = ((a.double() - r).abs().max() / r.abs().max().clamp(min=1e-6)).item()
    print(label, " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    assert out.dtype == args[0].dtype and torch.isfinite(out).all()
    assert errs["y"] < fwd_tol, (label, errs)
    bad = {k: v for k, v in errs.items() if k != "y" and v > grad_tol}
    assert not bad, (label, bad)


def _run_case(batch, groups, d, length, dtype, device, chunk=None, delta_softplus=True, bias_shift=-2.0,
              fwd_tol=1e-5, grad_tol=1e-5, seed=0, **cfg):
    from lamamba_dist.ops import scan_triton as st

    args = _inputs(batch, groups, d, length, dtype, device, seed=seed, bias_shift=bias_shift)
    if cfg:  # launch-config overrides: call the launchers directly
        u, delta, A, B, C, D, bias = (a.detach() for a in args)
        chunk = chunk or st.default_chunk(length)
        fwd_cfg = {k[4:]: v for k, v in cfg.items() if k.startswith("fwd_")}  # fwd_nsub, fwd_stages
        cfg = {k: v for k, v in cfg.items() if not k.startswith("fwd_")}
        out, states = st.scan1_fwd_launch(u, delta, A, B, C, D, bias, delta_softplus, chunk,
                                          sub_d=cfg.get("sub_d"), num_warps=cfg.get("num_warps"), **fwd_cfg)
        gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
        grads = st.scan1_bwd_launch(u, delta, A, B, C, D, bias, gy, states, delta_softplus, chunk, **cfg)
    else:
        out = st.selective_scan_triton(*args, delta_softplus=delta_softplus, chunk=chunk)
        gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
        grads = torch.autograd.grad(out, args, gy)
    label = f"{dtype} L={length} chunk={chunk} softplus={delta_softplus} bias_shift={bias_shift} {cfg}"
    _compare(args, out, grads, gy, delta_softplus, fwd_tol, grad_tol, label)
    return out, grads


def _aliased_case(batch, groups, d, length, dtype, device, chunk=None, **cfg):
    """The launchers writing y over u, and gu, gdelta over gy, delta (as ss2d_core does with its own
    temporaries) give bit for bit what they give into fresh tensors."""
    from lamamba_dist.ops import scan_triton as st

    u, delta, A, B, C, D, bias = (a.detach() for a in _inputs(batch, groups, d, length, dtype, device))
    chunk = chunk or st.default_chunk(length)
    fwd_cfg = {k: v for k, v in cfg.items() if k in ("sub_d", "num_warps")}
    fwd_cfg.update({k[4:]: v for k, v in cfg.items() if k.startswith("fwd_")})  # fwd_nsub, fwd_stages
    cfg = {k: v for k, v in cfg.items() if not k.startswith("fwd_")}
    y0, states = st.scan1_fwd_launch(u, delta, A, B, C, D, bias, True, chunk, **fwd_cfg)
    u2 = u.clone()
    y1, states1 = st.scan1_fwd_launch(u2, delta, A, B, C, D, bias, True, chunk, y=u2, **fwd_cfg)
    assert y1.data_ptr() == u2.data_ptr()
    assert torch.equal(y1, y0) and torch.equal(states1, states)

    def channel_major(t):  # (dim, batch, L) in memory, seen as (batch, dim, L)
        return t.transpose(0, 1).clone(memory_format=torch.contiguous_format).transpose(0, 1)

    y2, states2 = st.scan1_fwd_launch(u, channel_major(delta), A, B, C, D, bias, True, chunk, **fwd_cfg)
    assert torch.equal(y2, y0) and torch.equal(states2, states)
    gy = torch.randn(u.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    g0 = st.scan1_bwd_launch(u, delta, A, B, C, D, bias, gy, states, True, chunk, **cfg)
    gy2, delta2 = gy.clone(), delta.clone()
    g1 = st.scan1_bwd_launch(u, delta2, A, B, C, D, bias, gy2, states, True, chunk, gu=gy2, gdelta=delta2, **cfg)
    assert g1[0].data_ptr() == gy2.data_ptr() and g1[1].data_ptr() == delta2.data_ptr()
    for name, a, b in zip(NAMES, g1, g0):
        assert torch.equal(a, b), name
    # delta channel-major, gdelta written over it in that layout
    delta3 = channel_major(delta)
    g2 = st.scan1_bwd_launch(u, delta3, A, B, C, D, bias, gy, states, True, chunk, gdelta=delta3, **cfg)
    assert g2[1].data_ptr() == delta3.data_ptr() and g2[1].stride() == delta3.stride()
    for name, a, b in zip(NAMES, g2, g0):
        assert torch.equal(a, b), name
    g3 = st.scan1_bwd_launch(u, channel_major(delta), A, B, C, D, bias, gy, states, True, chunk,
                             **cfg)  # a fresh gdelta in delta's layout
    assert torch.equal(g3[1], g0[1]) and (batch == 1 or g3[1].stride() == delta3.stride())


def _partial_sums_case():
    """The one-launch reduction of the backward's partial sums against torch's sums: a batch beyond one tile of
    rows (32), more rows than one program's 128, groups of more blocks than one tile (32), L off a power of two,
    gB and gC in bf16 and fp32."""
    from lamamba_dist.ops import scan_triton as st

    g = torch.Generator().manual_seed(5)
    batch, groups, per_group, dim, length = 37, 3, 40, 300, 70
    rows = torch.randn(3, batch, dim, generator=g)
    steps = torch.randn(2, batch, groups * per_group, length, generator=g)
    A, D, bias = torch.zeros(dim, 1), torch.zeros(dim), torch.zeros(dim)
    for dtype in (torch.bfloat16, torch.float32):
        B = C = torch.zeros(batch, groups, 1, length, dtype=dtype)
        gA, gB, gC, gD, gbias = st._reduce_partials(rows, steps, groups, A, B, C, D, bias)
        torch.testing.assert_close(torch.cat([gA.squeeze(1), gD, gbias]), rows.sum(1).flatten(), rtol=1e-6,
                                   atol=1e-5)
        want = steps.view(2, batch, groups, per_group, length).sum(3).unsqueeze(3).to(dtype)
        assert gB.dtype == gC.dtype == dtype and gB.shape == gC.shape == B.shape
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(gB, want[0], **tol)
        torch.testing.assert_close(gC, want[1], **tol)


# fp32 inputs: fp32 math in the kernel vs float64. bf16 inputs: the output and gu/gdelta/gB/gC are rounded to
# bf16 (relative 2^-9), everything else is fp32 on the same (bf16-valued) inputs.
FP32_TOL = dict(fwd_tol=2e-5, grad_tol=5e-5)
BF16_TOL = dict(fwd_tol=1e-2, grad_tol=2e-2)


# ----------------------------------------------------------------------------- GPU


def _triton_or_skip():
    from lamamba_dist.ops.selective_scan import triton_available

    if not triton_available():
        pytest.skip("triton does not import here (CUDA builds of torch ship it): pip install triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [64, 1024, 4096])
def test_triton_scan_matches_float64_on_gpu(dtype, length):
    _triton_or_skip()
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    _run_case(2, 4, 32, length, dtype, "cuda", **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("length,chunk", [(4096, 1024), (3000, 512), (200, 64)])
def test_triton_scan_chunked_length_on_gpu(length, chunk):
    _triton_or_skip()
    _run_case(2, 4, 16, length, torch.float32, "cuda", chunk=chunk, **FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(bias_shift=19.0), dict(delta_softplus=False, bias_shift=2.0),
                                dict(sub_d=1, nsub=1), dict(sub_d=2, nsub=4, num_warps=2)])
def test_triton_scan_variants_on_gpu(kw):
    _triton_or_skip()
    _run_case(2, 4, 8, 333, torch.float32, "cuda", **kw, **FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("length", [64, 256, 1024, 4096])
@pytest.mark.parametrize("stages", [2, 3])
def test_triton_scan_pipelined_sub_blocks_on_gpu(length, stages):
    """The loops over a program's sub-blocks software-pipelined (cp.async prefetch of the next sub-block, which
    only the compiled kernels do): the same results as the float64 recurrence, and written over the inputs bit for
    bit as into fresh tensors."""
    _triton_or_skip()
    cfg = dict(stages=stages, fwd_nsub=2, fwd_stages=stages)  # the forward's 64-step tiles hold 32 of the 64 rows
    _run_case(2, 4, 64, length, torch.float32, "cuda", **cfg, **FP32_TOL)
    _run_case(2, 4, 64, length, torch.bfloat16, "cuda", **cfg, **BF16_TOL)
    _aliased_case(2, 4, 64, length, torch.bfloat16, "cuda", **cfg)


@pytest.mark.gpu
def test_triton_scan_odd_group_size_and_real_width_on_gpu():
    _triton_or_skip()
    _run_case(2, 4, 3, 100, torch.float32, "cuda", **FP32_TOL)  # group of 3 channels: one channel a program
    _run_case(1, 4, 640, 256, torch.bfloat16, "cuda", **BF16_TOL)  # the model's width at one stage


@pytest.mark.gpu
def test_triton_scan_is_deterministic_and_auto_dispatches_to_it(monkeypatch):
    """Deterministic grads; "auto" takes the Triton kernel when mamba-ssm's kernel is not installed."""
    _triton_or_skip()
    import importlib

    from lamamba_dist.ops.selective_scan import selective_scan_triton

    monkeypatch.setattr(importlib.import_module("lamamba_dist.ops.selective_scan"), "_SCAN_CUDA", None)
    args = _inputs(4, 4, 64, 1024, torch.bfloat16, "cuda")
    runs = []
    for backend in ("triton", "triton", "auto"):
        out = selective_scan(*args, backend=backend)
        runs.append([out, *torch.autograd.grad(out.float().square().sum(), args)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    torch.testing.assert_close(selective_scan_triton(*args), runs[0][0], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("length", [64, 1024, 4096])
def test_triton_scan_writes_over_its_inputs_on_gpu(length):
    _triton_or_skip()
    # LaMamba-XL's widths at batch 4: thousands of programs in flight, each over its own rows
    dim = {64: 10240, 1024: 2560, 4096: 2560}[length]
    _aliased_case(4, 4, dim // 4, length, torch.bfloat16, "cuda")
    _aliased_case(2, 4, 16, length, torch.float32, "cuda", chunk=min(length, 256))


@pytest.mark.gpu
def test_triton_scan_under_torch_compile_fullgraph():
    _triton_or_skip()
    args = _inputs(2, 4, 32, 256, torch.bfloat16, "cuda")

    def step(u, delta, A, B, C, D, bias):
        y = selective_scan(u * 1.0, delta, A, B, C, D, bias, delta_softplus=True, backend="triton")
        return (y.float() * 0.5).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    loss_e = step(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss, loss_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- CPU (Triton's interpreter)


def _interpreter_cases():
    """Small shapes (the interpreter runs each program in numpy, slowly). Outputs of the launchers are
    poisoned: every torch.empty/empty_like made while a kernel runs is NaN-filled first."""
    with nan_poisoned_empty():
        f32, bf16 = torch.float32, torch.bfloat16
        _run_case(2, 4, 2, 64, f32, "cpu", **FP32_TOL)
        _run_case(2, 4, 2, 200, f32, "cpu", **FP32_TOL)  # L not a power of two
        _run_case(2, 4, 2, 200, f32, "cpu", chunk=64, **FP32_TOL)  # chunked L, ragged last chunk
        _run_case(2, 4, 2, 256, f32, "cpu", chunk=64, **FP32_TOL)  # chunked L, full chunks
        _run_case(2, 4, 2, 100, bf16, "cpu", **BF16_TOL)
        _run_case(2, 4, 2, 100, bf16, "cpu", chunk=32, **BF16_TOL)
        _run_case(1, 2, 4, 50, f32, "cpu", bias_shift=19.0, **FP32_TOL)  # softplus passes x > 20 through
        _run_case(1, 2, 4, 50, f32, "cpu", delta_softplus=False, bias_shift=2.0, **FP32_TOL)
        _run_case(1, 2, 8, 40, f32, "cpu", sub_d=2, nsub=2, **FP32_TOL)  # two programs per group, 2 sub-blocks
        _run_case(1, 2, 8, 40, f32, "cpu", sub_d=1, nsub=8, **FP32_TOL)
        # software-pipelined loops over sub-blocks (the interpreter runs them in order; the GPU tests time nothing
        # but check the same launch configurations compiled)
        _run_case(1, 2, 8, 40, f32, "cpu", sub_d=2, nsub=4, stages=3, fwd_nsub=2, fwd_stages=2, **FP32_TOL)
        _run_case(1, 2, 8, 40, bf16, "cpu", sub_d=1, nsub=8, stages=2, fwd_nsub=4, fwd_stages=3, **BF16_TOL)
        _run_case(1, 2, 8, 100, f32, "cpu", chunk=32, sub_d=2, fwd_nsub=4, fwd_stages=3, **FP32_TOL)  # chunked
        _run_case(1, 4, 3, 30, f32, "cpu", **FP32_TOL)  # group of 3 channels
        _run_case(1, 1, 4, 30, f32, "cpu", **FP32_TOL)  # one group
        # outputs written over the inputs: one tile, chunked L, several sub-blocks per program
        _aliased_case(2, 4, 2, 64, f32, "cpu")
        _aliased_case(2, 4, 2, 200, bf16, "cpu", chunk=64)
        _aliased_case(1, 2, 8, 40, f32, "cpu", sub_d=2, nsub=2)
        _aliased_case(1, 2, 8, 40, f32, "cpu", sub_d=2, nsub=4, stages=3, fwd_nsub=4, fwd_stages=3)
        _partial_sums_case()
        # the dispatch: backend="triton" runs the kernels on CPU tensors under the interpreter
        args = _inputs(1, 4, 2, 20, f32, "cpu")
        ref = selective_scan_reference(*args)
        torch.testing.assert_close(selective_scan(*args, backend="triton"), ref, rtol=1e-5, atol=1e-5)
    print("interpreter cases passed")


@needs_triton
def test_triton_scan_under_interpreter_on_cpu():
    run_interpreter_cases(__file__)


@needs_triton
def test_output_buffers_given_to_the_launchers_are_checked():
    from lamamba_dist.ops.scan_triton import _out_buffer

    like = torch.zeros(2, 8, 16, dtype=torch.bfloat16)
    assert _out_buffer(None, like, "y").shape == like.shape
    assert _out_buffer(like, like, "y") is like
    with pytest.raises(ValueError, match=r"gu must be torch.bfloat16 \(2, 8, 16\) on cpu \(contiguous\), got "
                                         r"torch.float32"):
        _out_buffer(torch.zeros(2, 8, 16), like, "gu")
    with pytest.raises(ValueError, match=r"gu must be .* \(contiguous\), got .* with strides \(128, 1, 8\)"):
        _out_buffer(torch.zeros(2, 16, 8, dtype=torch.bfloat16).transpose(1, 2), like, "gu")
    # a strided buffer (gdelta) takes its model's layout, fresh or given
    channel_major = torch.zeros(8, 2, 16, dtype=torch.bfloat16).transpose(0, 1)
    assert _out_buffer(None, channel_major, "gdelta", strided=True).stride() == (16, 32, 1)
    assert _out_buffer(channel_major, channel_major, "gdelta", strided=True) is channel_major
    with pytest.raises(ValueError, match=r"gdelta must be .* \(strides \(16, 32, 1\)\), got .* strides "
                                         r"\(128, 16, 1\)"):
        _out_buffer(like, channel_major, "gdelta", strided=True)


def test_launchers_reject_overlapping_delta_rows():
    from lamamba_dist.ops import scan_triton as st

    u, delta, A, B, C, D, bias = (a.detach() for a in _inputs(2, 1, 4, 8, torch.float32, "cpu"))
    states = torch.zeros(2, 4, 1)
    for bad in (delta[:1].expand(2, 4, 8), torch.zeros(2, 4, 16)[:, :, ::2], torch.zeros(2, 1, 8).expand(2, 4, 8)):
        with pytest.raises(ValueError, match="delta must have unit stride along L and rows that do not overlap"):
            st.scan1_bwd_launch(u, bad, A, B, C, D, bias, u.clone(), states, True, 8)
        with pytest.raises(ValueError, match="delta must have unit stride along L and rows that do not overlap"):
            st.scan1_fwd_launch(u, bad, A, B, C, D, bias, True, 8)


def test_triton_backend_without_triton_is_an_error_not_a_silent_fallback(monkeypatch):
    ss = importlib.import_module("lamamba_dist.ops.selective_scan")  # the package exports a function of that name

    args = _inputs(1, 4, 2, 5, torch.float32, "cpu")
    monkeypatch.setattr(ss, "_SCAN_TRITON", None)  # as on a machine where triton does not import
    with pytest.raises(RuntimeError, match="needs triton"):
        selective_scan(*args, backend="triton")
    torch.testing.assert_close(selective_scan(*args), selective_scan_reference(*args), rtol=0, atol=0)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (the test sets it)"
    _interpreter_cases()
