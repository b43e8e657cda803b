"""Window attention's Triton kernels (lamamba_dist/ops/window_attention_triton.py) and the dispatch point
``window_attention`` (lamamba_dist/ops/window_attention.py, ``attn_backend = "triton"``).

* CPU, always: "triton" is a backend of the model config, the bench and the parity tool; the PyTorch backends give,
  through ``window_attention``, exactly the former expression (q, k, v split, SDPA, transpose back), and on the
  map's tokens with a token order the gathered windows' result scattered back; "triton"
  without triton is an error, not a fallback; an unknown backend and a bias of the wrong shape are errors.
* CPU under Triton's interpreter (a subprocess running this file with TRITON_INTERPRET=1), skipped where triton is
  not installed: output and the gradients of qkv and of the bias against float64, at window sizes that fill the
  kernels' block (16 and 64 tokens) and that do not (9), head dims below, at and above the 16-wide chunk (5, 16, 20,
  40, 80), one and several window positions, the backward's images split into chunks of several sizes (one that
  does not divide the batch), bf16, the windows' rows and the map's tokens read through the (shifted) window order;
  outputs NaN-poisoned; bitwise equal runs; a shifted WindowAttention block
  against "sdpa", also under torch.compile(fullgraph=True, backend="aot_eager"); LaMamba-debug's whole forward and
  backward against the reference backends.
* GPU (``-m gpu``): the same against float64 at LaMamba-XL's three stages (fp32 and bf16), and LaMamba-debug against
  the reference model in both dtypes.
"""

import os

import pytest
import torch

from kernel_helpers import (assert_models_match, fast_and_reference_debug_models, nan_poisoned_empty, needs_triton,
                            run_interpreter_cases)
from lamamba_dist.config import ModelConfig
from lamamba_dist.ops.window_attention import BACKENDS, window_attention, window_attention_core, window_token_order


def _inputs(images, nw, n, heads, e, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(images * nw, n, 3 * heads * e, generator=g).to(device, dtype).requires_grad_()
    bias = torch.randn(nw, heads, n, n, generator=g)
    if nw > 1:  # a shift mask's -100 between regions in some windows
        bias[1:, :, : n // 2, n // 2:] -= 100.0
    bias = bias.to(device).requires_grad_()
    gy = torch.randn(images * nw, n, heads * e, generator=g).to(device, dtype)
    return qkv, bias, gy


def _reference_f64(qkv, bias, heads, gy):
    """softmax(q k^T e^-0.5 + bias) v in float64, with the gradients of qkv and bias for output gradient gy."""
    q64 = qkv.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    out = window_attention(q64, b64, heads, "reference")
    gq, gb = torch.autograd.grad(out, [q64, b64], gy.double())
    return out.detach(), gq, gb


def _check_tokens(images, side, window, shift, heads, e, dtype, device="cpu", tol=1e-5, programs=None):
    """The token layout: qkv (B, L, 3C) on the map's tokens read through the window order (shifted or not)."""
    from lamamba_dist.ops import window_attention_triton as wat

    nw, n = (side // window) ** 2, window * window
    order = window_token_order(side, window, shift)[0].to(device)
    qkv, bias, gy = _inputs(images, nw, n, heads, e, dtype, device, seed=7)
    qkv = qkv.detach().view(images, side * side, -1).requires_grad_()
    gy = gy.view(images, side * side, -1)
    q64 = qkv.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    ref = window_attention(q64, b64, heads, "reference", order=order)
    want = (ref.detach(), *torch.autograd.grad(ref, [q64, b64], gy.double()))
    if programs is None:
        out = window_attention(qkv, bias, heads, "triton", order=order)
        got = (out, *torch.autograd.grad(out, [qkv, bias], gy))
    else:
        out, lse = wat.window_attention_fwd_launch(qkv.detach(), bias.detach(), heads, order)
        got = (out, *wat.window_attention_bwd_launch(gy, qkv.detach(), bias.detach(), out, lse, heads, order,
                                                     programs=programs))
    assert got[0].shape == (images, side * side, qkv.shape[-1] // 3)
    for name, g, w in zip(("out", "qkv grad", "bias grad"), got, want):
        err = _rel(g, w)
        assert torch.isfinite(g).all() and err < tol, (images, side, window, shift, dtype, programs, name, err)


def _rel(got, want) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _check(images, nw, n, heads, e, dtype, device="cpu", tol=1e-5, programs=None):
    from lamamba_dist.ops import window_attention_triton as wat

    qkv, bias, gy = _inputs(images, nw, n, heads, e, dtype, device)
    want = _reference_f64(qkv, bias, heads, gy)
    if programs is None:
        out = window_attention(qkv, bias, heads, "triton")
        got = (out, *torch.autograd.grad(out, [qkv, bias], gy))
    else:  # the backward's images in chunks: about `programs` programs
        out, lse = wat.window_attention_fwd_launch(qkv.detach(), bias.detach(), heads)
        got = (out, *wat.window_attention_bwd_launch(gy, qkv.detach(), bias.detach(), out, lse, heads,
                                                     programs=programs))
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == bias.dtype
    for name, g, w in zip(("out", "qkv grad", "bias grad"), got, want):
        assert torch.isfinite(g).all(), name
        err = _rel(g, w)
        assert err < tol, (images, nw, n, heads, e, dtype, programs, name, err)


# ----------------------------------------------------------------------------- CPU, always


def test_triton_is_a_backend_everywhere():
    import dataclasses

    from lamamba_dist.bench.model import ATTN_BACKENDS
    from lamamba_dist.parity import ATTN_BACKENDS as PARITY_BACKENDS

    assert "triton" in BACKENDS and ATTN_BACKENDS == BACKENDS == PARITY_BACKENDS
    field = next(f for f in dataclasses.fields(ModelConfig) if f.name == "attn_backend")
    assert set(field.metadata["choices"]) == set(BACKENDS)
    assert field.default == "auto"


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_the_pytorch_backends_are_the_former_expression(backend):
    qkv, bias, _ = _inputs(2, 4, 16, 2, 8, torch.float32)
    bw, n, c3 = qkv.shape
    q, k, v = qkv.view(bw, n, 3, 2, c3 // 6).permute(2, 0, 3, 1, 4).unbind(0)
    want = window_attention_core(q, k, v, bias, 4, backend).transpose(1, 2).reshape(bw, n, c3 // 3)
    assert torch.equal(window_attention(qkv, bias, 2, backend), want)


def test_the_token_layout_is_the_windows_layout_through_the_order():
    """window_attention on the map's tokens with a token order (the shifted partition) equals the windows layout
    of the gathered tokens, scattered back (the PyTorch backends gather; "triton" reads through the order)."""
    from lamamba_dist.ops.window_attention import permute_tokens

    side, window, shift, heads, e = 8, 4, 2, 2, 8
    order, inverse = window_token_order(side, window, shift)
    qkv, bias, _ = _inputs(2, 4, 16, heads, e, torch.float32)
    tokens = qkv.detach().view(2, side * side, -1)
    got = window_attention(tokens, bias, heads, "reference", order=order)
    win = permute_tokens(tokens, order, inverse).view(8, 16, -1)
    want = permute_tokens(window_attention(win, bias, heads, "reference").view(2, side * side, -1), inverse, order)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="a token order needs the"):
        window_attention(tokens, None, heads, "sdpa", order=order)


def test_the_operator_override_replaces_auto():
    """LAMAMBA_ATTN_BACKEND (read at import) replaces "auto" in the dispatch and in WindowAttention; a bad value is
    an error naming the variable."""
    import subprocess
    import sys

    code = ("from lamamba_dist.ops.window_attention import resolve_attn_backend as r; "
            "print(r('auto'), r('sdpa'))")
    env = {k: v for k, v in os.environ.items() if k != "LAMAMBA_ATTN_BACKEND"}
    def run(extra):
        return subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                              timeout=300)

    assert run({}).stdout.split() == ["auto", "sdpa"]
    assert run({"LAMAMBA_ATTN_BACKEND": "reference"}).stdout.split() == ["reference", "sdpa"]
    bad = run({"LAMAMBA_ATTN_BACKEND": "cudnn"})
    assert bad.returncode != 0 and "LAMAMBA_ATTN_BACKEND='cudnn'" in bad.stderr


def test_triton_without_triton_is_an_error(monkeypatch):
    import importlib

    mod = importlib.import_module("lamamba_dist.ops.window_attention")
    monkeypatch.setattr(mod, "_WATTN_TRITON", None)
    qkv, bias, _ = _inputs(1, 1, 4, 1, 4, torch.float32)
    with pytest.raises(RuntimeError, match="needs triton"):
        window_attention(qkv, bias, 1, "triton")
    with pytest.raises(ValueError, match="unknown attention backend 'cudnn'"):
        window_attention(qkv, bias, 1, "cudnn")
    with pytest.raises(ValueError, match="unknown attention backend 'triton'"):  # only through window_attention
        window_attention_core(*qkv.view(1, 4, 3, 1, 4).permute(2, 0, 3, 1, 4).unbind(0), bias, 1, "triton")


@needs_triton
def test_a_bias_of_the_wrong_shape_is_an_error():
    from lamamba_dist.ops import window_attention_triton as wat

    qkv, bias, _ = _inputs(3, 2, 4, 2, 4, torch.float32)
    with pytest.raises(ValueError, match=r"bias must be \(nW, 2, 4, 4\) with nW dividing 6 windows"):
        wat.window_attention_triton(qkv, bias[:, :1], 2)
    with pytest.raises(ValueError, match="nW dividing 6"):
        wat.window_attention_triton(qkv, torch.zeros(4, 2, 4, 4), 2)
    with pytest.raises(ValueError, match=r"qkv must be \(B \* nW, N, 3 \* heads \* e\), or \(B, L, 3 \* heads \* e\)"):
        wat.window_attention_triton(qkv, bias, 5)
    with pytest.raises(ValueError, match=r"with a token order of shape \(12,\).*must have L = nW \* N tokens"):
        wat.window_attention_triton(qkv.view(2, 12, -1), bias, 2, torch.arange(12))  # 2 positions x 4 = 8, not 12


# ----------------------------------------------------------------------------- CPU (Triton's interpreter)


def _interpreter_cases():
    import copy

    from kernel_helpers import assert_compiles_like_eager, ss2d_run

    from lamamba_dist.models.lamamba import WindowAttention

    f32, bf16 = torch.float32, torch.bfloat16
    with nan_poisoned_empty():
        _check(2, 4, 16, 2, 20, f32)  # window 4, LaMamba-XL's first head dim: two chunks, the second masked
        _check(3, 1, 64, 2, 40, f32)  # window 8, one window position (a clipped window)
        _check(2, 1, 64, 1, 80, f32)  # five chunks
        _check(2, 2, 9, 3, 5, f32)  # window 3: 9 tokens in a block of 16, a head dim below the chunk
        _check(1, 2, 16, 2, 16, f32)  # a head dim of exactly one chunk
        for programs in (1, 2, 5):  # 5 images in 1 chunk, in chunks of 3 (the last partial), of 1
            _check(5, 2, 16, 2, 20, f32, programs=programs)
        _check(2, 4, 16, 2, 20, bf16, tol=2e-2)
        _check(2, 1, 64, 2, 40, bf16, tol=2e-2)
        # the token layout (the model's path): shifted and not, a clipped window, image chunks, bf16
        _check_tokens(2, 8, 4, 2, 2, 20, f32)
        _check_tokens(2, 8, 4, 0, 2, 40, f32)
        _check_tokens(3, 4, 4, 0, 2, 8, f32)
        _check_tokens(5, 8, 4, 2, 2, 20, f32, programs=3)
        _check_tokens(2, 8, 4, 2, 2, 20, bf16, tol=2e-2)
    # deterministic: bitwise equal runs
    runs = []
    for _ in range(2):
        qkv, bias, gy = _inputs(4, 2, 16, 2, 20, f32, seed=3)
        out = window_attention(qkv, bias, 2, "triton")
        runs.append([out, *torch.autograd.grad(out, [qkv, bias], gy)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    # no bias: zeros
    qkv, _, gy = _inputs(2, 1, 16, 2, 8, f32)
    torch.testing.assert_close(window_attention(qkv, None, 2, "triton"), window_attention(qkv, None, 2, "sdpa"),
                               rtol=1e-5, atol=1e-6)
    # a shifted block (window 4 on an 8x8 map, shift 2) against "sdpa", eagerly and compiled with no graph break
    torch.manual_seed(0)
    ref = WindowAttention(16, 2, 8, 4, 2, attn_backend="sdpa")
    with torch.no_grad():
        ref.relative_position_bias_table.normal_(0, 0.5)
    fast = copy.deepcopy(ref)
    fast.attn_backend = "triton"
    u = torch.randn(2, 8, 8, 16)
    out_r, g_r = ss2d_run(ref, u)
    out_f, g_f = ss2d_run(fast, u)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    for name, g in g_r.items():
        assert _rel(g_f[name], g.double()) < 1e-5, name
    assert_compiles_like_eager(fast, u)
    # LaMamba-debug's whole forward and backward (window 4, shifted blocks, clipped windows)
    _whole_model_on_cpu()
    print("interpreter cases passed")


def _whole_model_on_cpu():
    from lamamba_dist.models import create_model

    torch.manual_seed(0)
    common = dict(resolution=128, num_classes=10, class_dropout=0.0, scan_backend="reference", conv_backend="torch")
    ref = create_model("LaMamba-debug", **common, attn_backend="reference")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    fast = create_model("LaMamba-debug", **common, attn_backend="triton")
    fast.load_state_dict(ref.state_dict())
    s = ref.latent_size
    x, t, y = torch.randn(2, 4, s, s), torch.tensor([1, 500]), torch.tensor([0, 3])
    outs, grads = [], []
    for m in (fast, ref):
        out = m(x, t, y)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert _rel(outs[0], outs[1].double()) < 1e-5
    bias_grads = [n for n in grads[1] if n.endswith("relative_position_bias_table")]
    assert bias_grads and all(grads[1][n].abs().max() > 0 for n in bias_grads)
    for n, g in grads[1].items():
        assert ((grads[0][n] - g).abs().max() / g.abs().max().clamp(min=1e-6)).item() < 1e-4, n


@needs_triton
def test_window_attention_triton_under_interpreter_on_cpu():
    run_interpreter_cases(__file__)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_window_attention_triton_matches_float64_on_gpu(dtype, tol):
    # LaMamba-XL at 256 px, batch 4: (images, window positions, tokens, heads, head dim) of its three stages, the
    # first shifted; a window of 49 tokens (7 x 7) in a block of 64
    for images, nw, n, heads, e in ((4, 16, 64, 16, 20), (4, 4, 64, 16, 40), (4, 1, 64, 16, 80), (3, 4, 49, 4, 32)):
        _check(images, nw, n, heads, e, dtype, "cuda", tol=tol)
    # the model's token layout at the same stages, the first and second shifted
    for side, shift, e in ((32, 4, 20), (16, 4, 40), (8, 0, 80)):
        _check_tokens(4, side, 8, shift, 16, e, dtype, "cuda", tol=tol)
    _check(64, 1, 64, 16, 80, dtype, "cuda", tol=tol, programs=16)  # four images a backward program


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lamamba_with_triton_attention_matches_the_reference_model(dtype):
    assert_models_match(*fast_and_reference_debug_models(attn_backend="triton"), dtype)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (the test sets it)"
    _interpreter_cases()
