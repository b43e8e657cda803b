"""SS2D's gathered four-direction scan (the opt-in "ss2d_triton" / "ss2d_reference" scan backends).

* CPU, always: SS2D computed channels-last with the scan gathered from the grid (backend "ss2d_reference") equals
  the existing cross_scan / scan / cross_merge path (backend "reference") with the same weights, forward and every
  input and parameter grad, fp32; ss2d_scan_reference against a float64 restatement; the state dict is unchanged.
* CPU under Triton's interpreter (TRITON_INTERPRET=1, which must be set before triton's jit decorators run, hence
  a subprocess running this file), skipped where triton is not installed: the kernels' output and all seven grads
  against float64, fp32 and bf16, several L including chunked ones, odd channel counts, launch-config overrides,
  softplus variants, SS2D with backend "ss2d_triton" (also under torch.compile(fullgraph=True, backend="aot_eager")),
  determinism. Outputs are NaN-poisoned first.
* GPU (``-m gpu``): fp32/bf16 parity at L up to 4096, chunk/config variants, the model's widths, determinism,
  torch.compile(fullgraph=True) of SS2D, and a whole LaMamba-debug forward/backward against the reference backend.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from kernel_helpers import (assert_compiles_like_eager, assert_models_match, nan_poisoned_empty, needs_triton,
                            run_interpreter_cases, ss2d_run)
from lamamba_dist.models.lamamba import SS2D
from lamamba_dist.ops.cross_scan import cross_merge, cross_scan, snake_tables
from lamamba_dist.ops.selective_scan import (
    resolve_backend,
    selective_scan_reference,
    ss2d_scan,
    ss2d_triton_available,
)

NAMES = "x delta B C A D bias".split()
K = 4


def _inputs(batch, n, dim, dtype, device, seed=0, bias_shift=-2.0):
    """Grid-layout inputs of ss2d_scan for an n x n map: x (B, L, D), delta (B, L, 4, D), B/C (B, L, 4),
    A (4D, 1), D and bias (4D,)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    length = n * n
    x = mk(batch, length, dim).to(device, dtype)
    delta = mk(batch, length, K, dim, scale=0.5).to(device, dtype)
    B = mk(batch, length, K).to(device, dtype)
    C = mk(batch, length, K).to(device, dtype)
    A = -torch.exp(mk(K * dim, 1, scale=0.5)).to(device)
    D = mk(K * dim).to(device)
    bias = (mk(K * dim, scale=0.5) + bias_shift).to(device)
    return [t.requires_grad_() for t in (x, delta, B, C, A, D, bias)]


def _ss2d64(x, delta, B, C, A, D, bias, paths, inverse, delta_softplus=True):
    """The four scans along the snake paths and their merge, restated in float64 (a loop over L)."""
    x, delta, B, C, A, D, bias = (t.double() for t in (x, delta, B, C, A, D, bias))
    batch, length, dim = x.shape
    A, D, bias = A.reshape(K, dim), D.reshape(K, dim), bias.reshape(K, dim)
    xs = torch.stack([x[:, paths[k]] for k in range(K)], 1)  # (B, K, L, D): step order of each direction
    ds = torch.stack([delta[:, paths[k], k] for k in range(K)], 1)
    bs = torch.stack([B[:, paths[k], k] for k in range(K)], 1)  # (B, K, L)
    cs = torch.stack([C[:, paths[k], k] for k in range(K)], 1)
    v = ds + bias[None, :, None, :]
    dt = F.softplus(v) if delta_softplus else v
    a = torch.exp(dt * A[None, :, None, :])
    bu = dt * bs[..., None] * xs
    h = x.new_zeros(batch, K, dim)
    ys = []
    for s in range(length):
        h = a[:, :, s] * h + bu[:, :, s]
        ys.append(h * cs[:, :, s, None])
    ys = torch.stack(ys, 2) + D[None, :, None, :] * xs  # (B, K, L, D)
    return sum(ys[:, k, inverse[k]] for k in range(K))  # grid position p gets step inverse[k, p] of direction k


def _compare(args, out, grads, gy, paths, inverse, delta_softplus=True, fwd_tol=1e-5, grad_tol=1e-5, label=""):
    """Relative max errors (scaled by the reference's max magnitude) of out and the 7 grads vs float64."""
    ref_args = [a.detach().double().requires_grad_() for a in args]
    ref = _ss2d64(*ref_args, paths, inverse, delta_softplus=delta_softplus)
    ref_grads = torch.autograd.grad(ref, ref_args, gy.double())
    errs = {"y": ((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()}
    for name, a, arg, r in zip(NAMES, grads, args, ref_grads):
        assert a.dtype == arg.dtype and a.shape == arg.shape, (name, a.dtype, arg.dtype, a.shape, arg.shape)
        assert torch.isfinite(a).all(), name
        errs[name] = ((a.double() - r).abs().max() / r.abs().max().clamp(min=1e-6)).item()
    print(label, " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    assert out.dtype == args[0].dtype and out.shape == args[0].shape and torch.isfinite(out).all()
    assert errs["y"] < fwd_tol, (label, errs)
    bad = {k: v for k, v in errs.items() if k != "y" and v > grad_tol}
    assert not bad, (label, bad)


def _run_case(batch, n, dim, dtype, device, chunk=None, delta_softplus=True, bias_shift=-2.0, fwd_tol=1e-5,
              grad_tol=1e-5, seed=0, **cfg):
    """The Triton kernels (through the custom op, or the launchers when ``cfg`` overrides the launch) vs float64."""
    from lamamba_dist.ops import ss2d_triton as st

    paths, inverse = snake_tables(n, device)
    args = _inputs(batch, n, dim, dtype, device, seed=seed, bias_shift=bias_shift)
    if cfg:
        x, delta, B, C, A, D, bias = (a.detach() for a in args)
        A = A.reshape(-1)
        chunk = chunk or st.default_chunk(n * n, dim)
        out, states = st.ss2d_fwd_launch(x, delta, B, C, A, D, bias, paths, delta_softplus, chunk, **cfg)
        gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
        grads = list(st.ss2d_bwd_launch(x, delta, B, C, A, D, bias, paths, gy, states, delta_softplus, chunk, **cfg))
        grads[4] = grads[4].reshape(args[4].shape)
    else:
        out = st.ss2d_scan(*args, paths, inverse, delta_softplus=delta_softplus, chunk=chunk)
        gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
        grads = torch.autograd.grad(out, args, gy)
    label = f"{dtype} n={n} dim={dim} chunk={chunk} softplus={delta_softplus} bias_shift={bias_shift} {cfg}"
    _compare(args, out, grads, gy, paths, inverse, delta_softplus, fwd_tol, grad_tol, label)
    return out, grads


# fp32: fp32 math in the kernel vs float64. bf16: the output and grads of x/delta/B/C are rounded to bf16.
FP32_TOL = dict(fwd_tol=2e-5, grad_tol=5e-5)
BF16_TOL = dict(fwd_tol=1e-2, grad_tol=2e-2)


# ----------------------------------------------------------------------------- CPU: the layout math


def _ss2d_pair(dim, resolution, seed=0):
    torch.manual_seed(seed)
    old = SS2D(dim, scan_backend="reference", resolution=resolution)
    old.reset_ssm_parameters()
    with torch.no_grad():  # move every parameter off its init so each one matters
        for p in old.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    new = copy.deepcopy(old)
    new.scan_backend = "ss2d_reference"
    return old, new


@pytest.mark.parametrize("dim,n,resolution", [(8, 8, 8), (12, 4, 4), (6, 6, None), (16, 4, 8)])
def test_gathered_ss2d_equals_existing_ss2d_on_cpu(dim, n, resolution):
    """Channels-last SS2D with grid-layout projections and the gathered reference scan == cross_scan / scan /
    cross_merge SS2D, forward and the grads of the input and every parameter (fp32). resolution None: tables from
    the cache; (16, 4, 8): buffers built for another map size, so the cache is used."""
    old, new = _ss2d_pair(dim, resolution)
    u = torch.randn(2, n, n, dim, generator=torch.Generator().manual_seed(3))
    out_old, g_old = ss2d_run(old, u)
    out_new, g_new = ss2d_run(new, u)
    torch.testing.assert_close(out_new, out_old, rtol=1e-5, atol=1e-6)
    assert set(g_new) == set(g_old) and len(g_old) == 1 + len(list(old.parameters()))
    for name, g in g_old.items():
        scale = g.abs().max().clamp(min=1e-6)
        err = ((g_new[name] - g).abs().max() / scale).item()
        assert err < 1e-5, (name, err)


def test_ss2d_reference_matches_float64_and_the_cross_scan_path():
    paths, inverse = snake_tables(6)
    args = _inputs(2, 6, 5, torch.float32, "cpu")
    out = ss2d_scan(*args, paths, inverse, backend="ss2d_reference")
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(out, args, gy)
    _compare(args, out, grads, gy, paths, inverse, fwd_tol=2e-6, grad_tol=5e-6, label="reference")
    # and the same numbers through the unfused layout: cross_scan of the grid, scan, cross_merge
    x, delta, B, C, A, D, bias = (a.detach() for a in args)
    b, length, dim = x.shape
    xs = cross_scan(x.transpose(1, 2).reshape(b, dim, 6, 6))  # (B, 4, D, L)
    ds = torch.stack([delta[:, paths[k], k].transpose(1, 2) for k in range(K)], 1)
    bs = torch.stack([B[:, paths[k], k] for k in range(K)], 1).unsqueeze(2)
    cs = torch.stack([C[:, paths[k], k] for k in range(K)], 1).unsqueeze(2)
    ys = selective_scan_reference(xs.reshape(b, K * dim, length), ds.reshape(b, K * dim, length), A, bs, cs, D, bias)
    y = cross_merge(ys.view(b, K, dim, length), 6).transpose(1, 2)
    torch.testing.assert_close(out.detach(), y, rtol=1e-6, atol=1e-6)


def test_ss2d_backends_keep_the_state_dict_and_are_opt_in():
    a, b = SS2D(16, scan_backend="auto", resolution=8), SS2D(16, scan_backend="ss2d_triton", resolution=8)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    assert resolve_backend("ss2d_triton") == "ss2d_triton"
    with pytest.raises(ValueError, match="unknown scan backend"):
        resolve_backend("ss2d")
    from lamamba_dist.config import ModelConfig
    import dataclasses

    choices = {f.name: f for f in dataclasses.fields(ModelConfig)}["scan_backend"].metadata["choices"]
    assert "ss2d_triton" in choices and ModelConfig().scan_backend == "auto"


def test_ss2d_triton_without_triton_is_an_error_not_a_silent_fallback(monkeypatch):
    import importlib

    ss = importlib.import_module("lamamba_dist.ops.selective_scan")
    monkeypatch.setattr(ss, "_SS2D_TRITON", None)  # as on a machine where triton does not import
    paths, inverse = snake_tables(4)
    args = _inputs(1, 4, 2, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="needs triton"):
        ss2d_scan(*args, paths, inverse, backend="ss2d_triton")
    with pytest.raises(RuntimeError, match="needs triton"):
        SS2D(8, scan_backend="ss2d_triton", resolution=4)(torch.randn(1, 4, 4, 8))


# ----------------------------------------------------------------------------- CPU (Triton's interpreter)


def _interpreter_cases():
    """Small shapes (the interpreter runs each program in numpy, slowly). Every torch.empty/empty_like made while
    the launchers run is NaN-filled first, so an element a kernel fails to write shows up."""
    from lamamba_dist.ops import ss2d_triton as st

    with nan_poisoned_empty():
        f32, bf16 = torch.float32, torch.bfloat16
        _run_case(2, 4, 5, f32, "cpu", **FP32_TOL)  # L 16 in one chunk, 5 of 8 channels
        _run_case(2, 6, 3, f32, "cpu", **FP32_TOL)  # L 36: not a power of two (masked tail steps)
        _run_case(1, 6, 3, f32, "cpu", chunk=8, **FP32_TOL)  # chunked L, ragged last chunk
        _run_case(1, 8, 20, f32, "cpu", chunk=16, **FP32_TOL)  # 4 full chunks; 2 channel blocks, the 2nd partial
        _run_case(1, 12, 4, f32, "cpu", chunk=32, **FP32_TOL)  # L 144 in 5 chunks
        _run_case(1, 8, 6, bf16, "cpu", **BF16_TOL)
        _run_case(1, 8, 6, bf16, "cpu", chunk=16, **BF16_TOL)
        _run_case(1, 4, 4, f32, "cpu", bias_shift=19.0, **FP32_TOL)  # softplus passes x > 20 through
        _run_case(1, 4, 4, f32, "cpu", delta_softplus=False, bias_shift=2.0, **FP32_TOL)
        _run_case(1, 4, 5, f32, "cpu", sub_d=2, num_warps=1, **FP32_TOL)  # 3 channel blocks of 2
        _run_case(1, 6, 7, f32, "cpu", chunk=16, sub_d=4, **FP32_TOL)

        # deterministic: two runs are bitwise equal
        paths, inverse = snake_tables(8)
        args = _inputs(2, 8, 6, f32, "cpu", seed=3)
        runs = []
        for _ in range(2):
            out = st.ss2d_scan(*args, paths, inverse, chunk=16)
            runs.append([out, *torch.autograd.grad(out.square().sum(), args)])
        for a, b in zip(*runs):
            assert torch.equal(a, b)

        # SS2D with backend "ss2d_triton" == "ss2d_reference" (and so == the existing path, tested above)
        _, ref = _ss2d_pair(8, 8)
        fast = copy.deepcopy(ref)
        fast.scan_backend = "ss2d_triton"
        u = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(5))
        out_r, g_r = ss2d_run(ref, u)
        out_f, g_f = ss2d_run(fast, u)
        torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-6)
        for name, g in g_r.items():
            err = ((g_f[name] - g).abs().max() / g.abs().max().clamp(min=1e-6)).item()
            assert err < 2e-5, (name, err)

        # dynamo + AOTAutograd trace SS2D through the custom ops (fake kernels, autograd) with no graph break
        assert_compiles_like_eager(fast, u)
    print("interpreter cases passed")


@needs_triton
def test_ss2d_triton_under_interpreter_on_cpu():
    run_interpreter_cases(__file__)


# ----------------------------------------------------------------------------- GPU


def _triton_or_skip():
    if not ss2d_triton_available():
        pytest.skip("triton does not import here (CUDA builds of torch ship it): pip install triton")


@pytest.fixture
def no_tf32():
    """fp32 parity on GPU: no TF32 in matmuls or (depthwise) convolutions (cudnn allows it by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,n,dim", [(2, 8, 64), (2, 16, 40), (2, 32, 48), (1, 64, 16)])
def test_ss2d_triton_matches_float64_on_gpu(dtype, batch, n, dim):
    _triton_or_skip()
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    _run_case(batch, n, dim, dtype, "cuda", **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(chunk=1024, sub_d=2), dict(chunk=64), dict(chunk=32, sub_d=32, num_warps=4),
                                dict(chunk=256, sub_d=8, num_warps=8), dict(sub_d=1), dict(bias_shift=19.0),
                                dict(delta_softplus=False, bias_shift=2.0)])
def test_ss2d_triton_variants_on_gpu(kw):
    _triton_or_skip()
    _run_case(2, 32, 24, torch.float32, "cuda", **kw, **FP32_TOL)


@pytest.mark.gpu
def test_ss2d_triton_model_widths_on_gpu():
    _triton_or_skip()
    _run_case(1, 16, 1280, torch.bfloat16, "cuda", **BF16_TOL)  # LaMamba-XL's 16 x 16 stage
    _run_case(1, 32, 640, torch.bfloat16, "cuda", **BF16_TOL)  # and its 32 x 32 stage
    _run_case(1, 9, 7, torch.float32, "cuda", **FP32_TOL)  # odd map side and channel count


@pytest.mark.gpu
def test_ss2d_triton_is_deterministic_on_gpu():
    _triton_or_skip()
    paths, inverse = snake_tables(32, "cuda")
    args = _inputs(4, 32, 256, torch.bfloat16, "cuda")
    runs = []
    for _ in range(3):
        out = ss2d_scan(*args, paths, inverse, backend="ss2d_triton")
        runs.append([out, *torch.autograd.grad(out.float().square().sum(), args)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_ss2d_module_compiles_fullgraph_and_matches_eager_on_gpu(autocast, no_tf32):
    """torch.compile(fullgraph=True) raises on any graph break: the custom ops trace through."""
    _triton_or_skip()
    torch.manual_seed(0)
    ref = SS2D(64, scan_backend="reference", resolution=16)
    ref.reset_ssm_parameters()
    ref = ref.cuda()
    fast = copy.deepcopy(ref)
    fast.scan_backend = "ss2d_triton"
    x = torch.randn(2, 16, 16, 64, device="cuda")
    tol = dict(rtol=3e-2, atol=3e-2) if autocast else dict(rtol=1e-4, atol=1e-4)
    results = []
    for fn in (fast, torch.compile(fast, fullgraph=True), ref):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out, grads = ss2d_run(fn, x)
        results.append((out.float(), grads))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], **tol)
        for name, g in results[0][1].items():
            scale = g.float().abs().max().clamp(min=1e-3)
            err = ((grads[name].float() - g.float()).abs().max() / scale).item()
            assert err < (1e-1 if autocast else 1e-3), (name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lamamba_debug_with_ss2d_triton_matches_reference_backend_on_gpu(dtype, no_tf32):
    """A whole LaMamba-debug forward/backward: scan_backend "ss2d_triton" vs "reference" (attention "reference" in
    both, so the scan path is the only difference)."""
    _triton_or_skip()
    from lamamba_dist.models import create_model

    models = []
    for backend in ("ss2d_triton", "reference"):
        torch.manual_seed(0)
        m = create_model("LaMamba-debug", resolution=128, num_classes=10, class_dropout=0.0,
                         scan_backend=backend, attn_backend="reference").cuda()
        models.append(m)
    fast, ref = models
    with torch.no_grad():
        for p in fast.parameters():  # leave adaLN-Zero so every branch contributes
            p.add_(torch.randn_like(p) * 0.02)
    ref.load_state_dict(fast.state_dict())
    assert_models_match(fast, ref, dtype)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (the test sets it)"
    _interpreter_cases()
