"""ss2d_core: SS2D's scan core with a lean backward (keeps x and the rank-R deltas, regathers / recomputes the
rest) equals plain autograd through cross_scan + projections + selective scan + cross_merge, and keeps less."""

import math
import os

import pytest
import torch

from kernel_helpers import needs_triton, run_interpreter_cases
from lamamba_dist.ops import cross_merge, cross_scan, selective_scan, snake_tables
from lamamba_dist.ops.ss2d_core import ss2d_core


def _params(d, k=4, r=3, n=1, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device)
    return dict(
        x_proj_weight=mk(k, r + 2 * n, d, scale=d ** -0.5).requires_grad_(True),
        dt_projs_weight=mk(k, d, r, scale=r ** -0.5).requires_grad_(True),
        A_logs=(torch.rand(k * d, n, generator=g) * 1.5).to(device).requires_grad_(True),
        Ds=mk(k * d).requires_grad_(True),
        dt_bias=(mk(k * d, scale=0.5) - 2.0).requires_grad_(True),
    )


def _plain(x, p, n_side, backend):
    b, d, length = x.shape
    k, r = p["dt_projs_weight"].shape[0], p["dt_projs_weight"].shape[2]
    xs = cross_scan(x.view(b, d, n_side, n_side))
    x_dbl = torch.matmul(p["x_proj_weight"].to(x.dtype), xs)
    dts_r, bs, cs = torch.split(x_dbl, [r, 1, 1], dim=2)
    dts = torch.matmul(p["dt_projs_weight"].to(x.dtype), dts_r)
    a = -torch.exp(p["A_logs"].float())
    ys = selective_scan(xs.reshape(b, k * d, length), dts.reshape(b, k * d, length), a, bs, cs, p["Ds"].float(),
                        p["dt_bias"].float(), True, backend=backend)
    return cross_merge(ys.view(b, k, d, length), n_side).transpose(1, 2)  # channels-last, as ss2d_core returns


def _lean(x, p, n_side, kernel, core="auto"):
    paths, inverse = snake_tables(n_side, x.device)
    a = -torch.exp(p["A_logs"].float())
    return ss2d_core(x, p["x_proj_weight"], p["dt_projs_weight"], a, p["Ds"], p["dt_bias"], paths, inverse, kernel,
                     core=core)


def _lean_op(x, p, n_side, kernel):
    """The core as custom ops (scan_core "op"; the "reference" kernel runs as the function either way)."""
    return _lean(x, p, n_side, kernel, core="op")


def _lean_cl(x, p, n_side, kernel, core="op"):
    """x passed channels-last (B, L, D), as SS2D does: x's gradient comes back channels-last."""
    paths, inverse = snake_tables(n_side, x.device)
    a = -torch.exp(p["A_logs"].float())
    x_cl = x.transpose(1, 2)  # a view: autograd takes the gradient back to (B, D, L) for the comparison
    return ss2d_core(x_cl, p["x_proj_weight"], p["dt_projs_weight"], a, p["Ds"], p["dt_bias"], paths, inverse,
                     kernel, channels_last=True, core=core)


def _lean_cl_function(x, p, n_side, kernel):
    return _lean_cl(x, p, n_side, kernel, core="function")


def _run(fn, x, p, *args):
    x = x.detach().clone().requires_grad_(True)
    for t in p.values():
        t.grad = None
    y = fn(x, p, *args)
    g = torch.Generator().manual_seed(7)
    y.float().mul(torch.randn(y.shape, generator=g).to(y.device)).sum().backward()
    return y.detach().float(), {"x": x.grad.float(), **{n: t.grad.float() for n, t in p.items()}}


def _assert_lean_matches_plain_reference(n_side, d, kernel, rtol, atol):
    """fp32 CPU: the lean core with ``kernel`` vs plain autograd through the reference scan, output and grads."""
    p = _params(d)
    x = torch.randn(2, d, n_side * n_side, generator=torch.Generator().manual_seed(1))
    y0, g0 = _run(_plain, x, p, n_side, "reference")
    for lean in (_lean, _lean_op, _lean_cl, _lean_cl_function):
        y1, g1 = _run(lean, x, p, n_side, kernel)
        torch.testing.assert_close(y1, y0, rtol=rtol, atol=atol)
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=10 * rtol, atol=10 * atol,
                                       msg=f"{lean.__name__} {name}")


@pytest.mark.parametrize("n_side,d", [(4, 5), (3, 8), (6, 2)])
def test_lean_core_equals_plain_autograd_fp32(n_side, d):
    _assert_lean_matches_plain_reference(n_side, d, "reference", rtol=1e-5, atol=1e-6)


def test_lean_core_keeps_less_than_one_snake_copy_for_backward():
    # D = 32 against the rank's 3, padded to 8 (RANK_ALIGN): in the models R = C/16 against D = 2C
    b, d, n_side = 2, 32, 8
    length = n_side * n_side
    p = _params(d)
    x = torch.randn(b, d, length, requires_grad=True)
    saved = []

    def pack(t):
        if not any(t is q for q in p.values()):
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _lean(x, p, n_side, "reference")
    snake_copy = b * 4 * d * length * 4  # one (B, 4, D, L) fp32 tensor: plain autograd keeps two (xs and dts)
    assert 0 < sum(saved) < snake_copy, (sum(saved), snake_copy)


@pytest.mark.parametrize("channels_last", [False, True])
def test_eager_core_never_copies_a_weight_over_the_batch(monkeypatch, channels_last):
    """The projections run per direction with the weight broadcast over B (batch stride 0): no copy, clone or
    cast in the core's forward or backward reads an expanded tensor. torch.matmul's broadcast of a (K, M, N)
    weight against (B, K, N, L) copies it B times, which at LaMamba-XL's 8x8 stage is more than the map."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lamamba_dist.ops import ss2d_core as sc

    def fwd(u, delta, A, B, C, D, bias, softplus, reuse=False):  # the scan kernel is not what this test looks at
        return u * 2.0, u.new_zeros(0, dtype=torch.float32)

    def bwd(u, delta, A, B, C, D, bias, dout, states, softplus, reuse=False):
        return (dout * 2.0, dout * 0.5, torch.zeros_like(A), torch.zeros_like(B), torch.ones_like(C),
                torch.zeros_like(D), torch.zeros_like(bias))

    monkeypatch.setitem(sc.KERNELS, "stub", lambda: (fwd, bwd))
    copies = {torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}
    expanded = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in copies:
                for t in args:
                    if isinstance(t, torch.Tensor) and any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
                        expanded.append((str(func), tuple(t.shape)))
            return func(*args, **(kwargs or {}))

    b, d, n_side = 3, 16, 3
    length = n_side * n_side
    p = {k: v.detach() for k, v in _params(d, r=5).items()}
    x = torch.randn(b, length, d) if channels_last else torch.randn(b, d, length)
    paths, inverse = snake_tables(n_side)
    a = -torch.exp(p["A_logs"])
    with Watch():
        y, dts_r, bs, cs, states = sc._core_forward(x, p["x_proj_weight"], p["dt_projs_weight"], a, p["Ds"],
                                                    p["dt_bias"], paths, inverse, "stub", "torch", channels_last)
        grads = sc._core_backward(torch.randn_like(y), x, p["x_proj_weight"], p["dt_projs_weight"], dts_r, bs, cs, a,
                                  p["Ds"], p["dt_bias"], states, paths, inverse, "stub", "torch", channels_last)
    assert expanded == []
    # and the per-direction GEMMs compute what torch.matmul's broadcast does
    xs = sc._gather_xs(x, paths, inverse, "torch", channels_last)
    assert dts_r.shape[2] == 8 and not dts_r[:, :, 5:].any()  # rank 5 padded with zero rows (RANK_ALIGN)
    assert torch.allclose(dts_r[:, :, :5], torch.matmul(p["x_proj_weight"], xs)[:, :, :5], atol=1e-5)
    assert grads[0].shape == x.shape and grads[1].shape == p["x_proj_weight"].shape


def test_lean_core_rejects_unknown_kernel_and_core():
    p = _params(2)
    with pytest.raises(ValueError, match="kernel must be one of"):
        _lean(torch.randn(1, 2, 4), p, 2, "nope")
    with pytest.raises(ValueError, match="unknown scan core 'fast'; choose one of auto, function, op"):
        _lean(torch.randn(1, 2, 4), p, 2, "reference", core="fast")


def test_default_core_runs_the_custom_ops_for_the_real_kernels(monkeypatch):
    """core "auto" is "op" (the faster and leaner core in a compiled step, docs/performance.md): with a real kernel
    ss2d_core calls the custom op; the "reference" kernel runs as the autograd.Function whatever the core."""
    from lamamba_dist.ops import ss2d_core as sc

    assert sc.resolve_core("auto") == "op"
    calls = []

    def fake_op(*args):
        calls.append(("op", args[8]))
        x = args[0]
        return (x.new_zeros(x.shape[0], x.shape[2], x.shape[1]),)

    def fake_function(*args):
        calls.append(("function", args[8]))
        return args[0].new_zeros(1)

    monkeypatch.setattr(sc, "_ss2d_core_fwd", fake_op)
    monkeypatch.setattr(sc._SS2DCore, "apply", fake_function)
    p = _params(2)
    x = torch.randn(1, 2, 4)
    for kernel in ("triton", "fused", "reference"):
        _lean(x, p, 2, kernel)
    _lean(x, p, 2, "triton", core="function")
    assert calls == [("op", "triton"), ("op", "fused"), ("function", "reference"), ("function", "triton")]


def test_scan_core_setting_reaches_every_ss2d():
    from lamamba_dist.bench.model import parse_model_spec
    from lamamba_dist.config import ModelConfig, model_kwargs
    from lamamba_dist.models import create_model

    model = create_model("LaMamba-debug", **model_kwargs(ModelConfig(resolution=64, scan_core="op")))
    cores = [m.scan_core for m in model.modules() if hasattr(m, "scan_core")]
    assert cores and set(cores) == {"op"}
    assert model_kwargs(ModelConfig(name="LaMamba-debug"))["scan_core"] == "auto"
    assert parse_model_spec("LaMamba-XL:core=op") == ("LaMamba-XL", dict(scan_core="op"))
    with pytest.raises(ValueError, match="core='fast'"):
        parse_model_spec("LaMamba-XL:core=fast")
    with pytest.raises(ValueError, match="unknown scan core 'fast'"):
        create_model("LaMamba-debug", resolution=64, scan_core="fast")


def _interpreter_cases():
    """The Triton d_state-1 kernels under TRITON_INTERPRET=1 on CPU tensors, through the lean core."""
    for n_side, d in [(4, 5), (6, 3)]:
        _assert_lean_matches_plain_reference(n_side, d, "triton", rtol=1e-4, atol=1e-5)
    # the whole model: SS2D through the lean core (default) vs plain autograd, same Triton kernels
    from lamamba_dist.models import create_model

    grads = []
    for lean, core in ((True, "op"), (True, "function"), (False, "auto")):
        torch.manual_seed(0)
        m = create_model("LaMamba-debug", resolution=32, scan_backend="triton", lean_scan_backward=lean,
                         class_dropout=0.0, scan_core=core)
        with torch.no_grad():
            for prm in m.parameters():  # leave adaLN-Zero so every branch contributes
                prm.add_(torch.randn_like(prm) * 0.02)
        x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
        out = m(x, torch.tensor([10, 900]), torch.tensor([1, 5]))
        out.square().mean().backward()
        grads.append((out.detach(), {n: prm.grad for n, prm in m.named_parameters()}))
    for lean in grads[:2]:  # both lean cores against plain autograd
        torch.testing.assert_close(lean[0], grads[2][0], rtol=1e-5, atol=1e-6)
        for name, g in grads[2][1].items():
            torch.testing.assert_close(lean[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    # torch.compile(fullgraph=True) traces through the lean core (autograd.Function + the kernels' custom ops)
    from lamamba_dist.models.lamamba import SS2D

    for core in ("op", "function"):
        torch.manual_seed(0)
        op = SS2D(16, scan_backend="triton", resolution=4, scan_core=core)
        op.reset_ssm_parameters()
        x = torch.randn(2, 4, 4, 16, requires_grad=True)
        eager = op(x)
        eager.square().sum().backward()
        g_eager, x.grad = x.grad.clone(), None
        torch._dynamo.reset()
        compiled = torch.compile(op, backend="aot_eager", fullgraph=True)(x)  # raises on a graph break
        compiled.square().sum().backward()
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, g_eager, rtol=1e-4, atol=1e-5)
    _compiled_ss2d_saves_no_snake_copy()
    _gemm_rows_are_16_byte_aligned()
    print("interpreter cases passed")


def _gemm_rows_are_16_byte_aligned():
    """Every GEMM of the core (channels-last, the Triton scan: SS2D's default path) reads and writes rows a
    multiple of 8 elements apart at LaMamba-XL's first-stage rank R = 20 (RANK_ALIGN): where a leading dimension
    is 20, cuBLAS takes its 2-element-aligned kernels. The padded rank's gradients are the unpadded ones."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lamamba_dist.ops import ss2d_core as sc

    aten = torch.ops.aten
    gemms = (aten.mm.default, aten.bmm.default, aten.addmm.default, aten.addmm_.default, aten.baddbmm_.default)
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in gemms:
                for t in [a for a in args if isinstance(a, torch.Tensor)] + [out]:
                    seen.append((str(func), tuple(t.shape), t.stride()[-2] if t.stride()[-1] == 1 else t.stride()[-1]))
            return out

    b, side, d, r = 2, 4, 16, 20
    p = {k: v.detach() for k, v in _params(d, r=r).items()}
    x = torch.randn(b, side * side, d)
    paths, inverse = snake_tables(side)
    a = -torch.exp(p["A_logs"])
    with Watch():
        y, dts_r, bs, cs, states = sc._core_forward(x, p["x_proj_weight"], p["dt_projs_weight"], a, p["Ds"],
                                                    p["dt_bias"], paths, inverse, "triton", "torch", True)
        gy = torch.randn_like(y)
        grads = sc._core_backward(gy, x, p["x_proj_weight"], p["dt_projs_weight"], dts_r, bs, cs, a, p["Ds"],
                                  p["dt_bias"], states, paths, inverse, "triton", "torch", True)
    assert len(seen) >= 7 * 3 and all(ld % 8 == 0 for _, _, ld in seen), [s for s in seen if s[2] % 8]
    assert dts_r.shape[2] == 24 and not dts_r[:, :, r:].any()
    assert grads[2].shape == (4, d, r) and grads[2].is_contiguous()
    # the same gradients as autograd through the unpadded core (the reference scan)
    ins = [t.clone().requires_grad_(True) for t in (x, p["x_proj_weight"], p["dt_projs_weight"], p["Ds"], p["dt_bias"])]
    ref = ss2d_core(ins[0], ins[1], ins[2], a, ins[3], ins[4], paths, inverse, "reference", channels_last=True)
    ref.backward(gy)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-4, atol=1e-5)
    for g, t in zip((grads[0], grads[1], grads[2], grads[4], grads[5]), ins):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-5)


def _compiled_ss2d_saves_no_snake_copy():
    """What a compiled SS2D keeps for its backward, from the forward graph Inductor's partitioner (min-cut) cuts.
    With the core as custom ops (scan_core "op") the lean core's choice survives compilation: no (B, 4, D, L)
    tensor, not xs, not dts, not a transposed xs. Through the autograd.Function ("function") the partitioner
    saves them."""
    import functools

    import torch._inductor.decomposition
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from lamamba_dist.models.lamamba import SS2D

    class Cut(Exception):
        pass

    def forward_graph(gm, _inputs):
        outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        for node in outs[1:]:  # the block's output, then what the backward keeps
            val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
            if isinstance(val, torch.Tensor) and node.op != "placeholder":
                saved.append(tuple(val.shape))
        raise Cut

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=forward_graph, bw_compiler=lambda g, _i: g,
                                     partition_fn=functools.partial(min_cut_rematerialization_partition,
                                                                    compiler="inductor"),
                                     decompositions=torch._inductor.decomposition.select_decomp_table())

    b, side, c = 2, 8, 16
    largest = {}
    for core in ("op", "function"):
        saved = []
        op = SS2D(c, scan_backend="triton", resolution=side, scan_core=core)
        op.reset_ssm_parameters()
        x = torch.randn(b, side, side, c, requires_grad=True)
        torch._dynamo.reset()  # a fresh compile with static shapes (the cases above compiled SS2D at another size)
        try:
            torch.compile(op, backend=backend, fullgraph=True, dynamic=False)(x)
        except Exception as e:  # the backend stops the compile once it has seen the forward graph
            if "Cut" not in repr(e):
                raise
        assert saved, core
        largest[core] = max(math.prod(s) for s in saved)
        if core == "op":  # x, the gate, out_norm's input and out_proj's: a few maps, where xs + dts + xs^T are 12
            assert sum(math.prod(s) for s in saved) < 8 * b * op.d_inner * side * side, saved
    snake_copy = b * 4 * op.d_inner * side * side
    assert largest["op"] < snake_copy <= largest["function"], largest


@needs_triton
def test_lean_core_with_triton_kernels_under_interpreter_on_cpu():
    run_interpreter_cases(__file__)


def _gpu_kernels():
    from lamamba_dist.ops.selective_scan import fused_available, triton_available

    return [k for k, ok in (("fused", fused_available()), ("triton", triton_available())) if ok]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_side,d", [(32, 64), (8, 40)])
def test_lean_core_matches_plain_path_on_gpu(dtype, n_side, d):
    kernels = _gpu_kernels()
    if not kernels:
        pytest.skip("neither mamba-ssm's kernel nor triton is available: pip install '.[cuda]' or triton")
    p = _params(d, r=4, device="cuda")
    x = torch.randn(3, d, n_side * n_side, device="cuda").to(dtype)
    for kernel in kernels:
        y0, g0 = _run(_plain, x, p, n_side, kernel)
        for lean in (_lean, _lean_op, _lean_cl):  # the function, the custom ops, the custom ops channels-last
            y1, g1 = _run(lean, x, p, n_side, kernel)
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(y1, y0, **tol)
            for name in g0:
                scale = g0[name].abs().max().clamp(min=1e-3)
                err = ((g1[name] - g0[name]).abs().max() / scale).item()
                assert err < (1e-3 if dtype == torch.float32 else 5e-2), (kernel, lean.__name__, name, err)


@pytest.mark.gpu
def test_lean_core_compiles_without_graph_break_and_saves_memory_on_gpu():
    kernels = _gpu_kernels()
    if not kernels:
        pytest.skip("neither mamba-ssm's kernel nor triton is available: pip install '.[cuda]' or triton")
    b, d, n_side = 16, 640, 32  # LaMamba-XL stage 0 at 256 px
    p = {k: v.detach().requires_grad_(True) for k, v in _params(d, r=20, device="cuda").items()}
    x = torch.randn(b, d, n_side * n_side, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for kernel in kernels:
        kept = {}  # memory held between the forward and the backward (what the graph saved + the output)
        for name, fn in (("plain", _plain), ("lean", _lean)):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            y = fn(x, p, n_side, kernel)
            kept[name] = torch.cuda.memory_allocated() - base
            y.float().sum().backward()
            del y
        # plain keeps xs and dts, 8 maps' worth; lean keeps about one map plus the rank-R deltas
        assert kept["lean"] < 0.4 * kept["plain"], (kernel, kept)
        compiled = torch.compile(lambda x_: _lean_op(x_, p, n_side, kernel), fullgraph=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = compiled(x)
        kept["compiled lean"] = torch.cuda.memory_allocated() - base
        torch.testing.assert_close(out.float(), _lean(x, p, n_side, kernel).float(), rtol=2e-2, atol=2e-2)
        out.float().sum().backward()
        # compiled as custom ops (scan_core "op"), the core still keeps about one map: the partitioner cannot see xs
        # and dts to save them
        assert kept["compiled lean"] < 0.4 * kept["plain"], (kernel, kept)


@pytest.mark.gpu
def test_eager_core_backward_holds_three_sequence_tensors_with_the_triton_scan_on_gpu():
    """Eagerly (the op core always runs so) the Triton scan writes its output over the gathered xs, and du, ddelta
    over gout, dts: the core's backward holds xs, dts and gout, not those three plus du and ddelta."""
    from lamamba_dist.ops.selective_scan import triton_available

    if not triton_available():
        pytest.skip("triton does not import here (CUDA builds of torch ship it): pip install triton")
    b, d, n_side = 16, 640, 32  # LaMamba-XL stage 0 at 256 px
    seq_bytes = b * 4 * d * n_side * n_side * 2  # one (B, 4, D, L) bf16 tensor
    p = {k: v.detach().to(torch.bfloat16).requires_grad_(True) if k in ("x_proj_weight", "dt_projs_weight")
         else v.detach().requires_grad_(True) for k, v in _params(d, r=20, device="cuda").items()}
    x = torch.randn(b, n_side * n_side, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
    for core in ("op", "function"):
        y = _lean_cl(x, p, n_side, "triton", core=core)
        gy = torch.randn_like(y)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y.backward(gy)
        torch.cuda.synchronize()
        transient = torch.cuda.max_memory_allocated() - base
        # three sequence tensors, x's gradient (a quarter of one) and the small ones (rank-R deltas' gradients,
        # B/C partials); with du and ddelta in their own memory it would be five and more
        assert transient < 4.0 * seq_bytes, (core, transient / seq_bytes)
        del y, gy
        x.grad = None


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (the test sets it)"
    _interpreter_cases()
