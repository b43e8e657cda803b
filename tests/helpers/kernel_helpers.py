"""Shared by the kernel tests: running a test file's Triton cases under the interpreter, compiling a kernel for
sm_90 without a GPU, NaN-poisoned kernel outputs, and the whole-model fast-vs-reference comparison used on GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

HELPERS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HELPERS))

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed: the interpreter tests of the Triton kernels need it (pip install '.[dev]')")


def run_interpreter_cases(test_file: str) -> None:
    """Run ``test_file`` as a script under TRITON_INTERPRET=1 (set before triton is imported, hence a fresh
    process); its ``__main__`` runs the CPU cases and prints "interpreter cases passed"."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, HELPERS, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(test_file)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "interpreter cases passed" in proc.stdout


def compile_for_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> None:
    """Compile the Triton kernel ``fn`` for an H100/H200 (sm_90) on this machine, GPU or not, through Triton's own
    front end, LLVM and the ptxas it ships: what the interpreter never checks (a name typed differently in the two
    branches of an ``if``, say) fails here as it would at the first launch on the GPU. ``signature`` maps each
    runtime argument to its Triton type ("*fp32", "*bf16", "i32", ...); ``constexprs`` gives the rest."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    assert kernel.asm.get("cubin"), fn


_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
                  torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def compile_launches_for_sm90(launch) -> list[str]:
    """Run ``launch()`` (which calls kernel launchers on CPU tensors) with every Triton launch captured instead of
    run, then compile each captured kernel for sm_90 (:func:`compile_for_sm90`) with the argument types and
    constexprs of its launch, as the JIT would on the GPU (integer arguments equal to 1 specialized to constexprs,
    as it does). Returns the compiled kernels' names, one per distinct specialization."""
    from triton.runtime.jit import JITFunction

    captured = []

    def capture(self, *args, grid, warmup, **kwargs):
        captured.append((self, args, kwargs))

    real_run = JITFunction.run
    JITFunction.run = capture
    try:
        launch()
    finally:
        JITFunction.run = real_run
    seen, names = set(), []
    for fn, args, kwargs in captured:
        values = dict(zip([p.name for p in fn.params], args))
        values.update({k: v for k, v in kwargs.items() if k in {p.name for p in fn.params}})
        signature, constexprs = {}, {}
        for p in fn.params:
            v = values.get(p.name, p.default)
            if p.is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1
                                  and not p.do_not_specialize):
                constexprs[p.name] = v
            elif isinstance(v, torch.Tensor):
                signature[p.name] = "*" + _TRITON_DTYPES[v.dtype]
            elif isinstance(v, bool):
                signature[p.name] = "i1"
            elif isinstance(v, int):
                signature[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            elif isinstance(v, float):
                signature[p.name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: no Triton type for argument {p.name} = {v!r}")
        opts = dict(num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3))
        key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
               tuple(sorted(opts.items())))
        if key in seen:
            continue
        seen.add(key)
        compile_for_sm90(fn, signature, constexprs, **opts)
        names.append(fn.__name__)
    return names


@contextmanager
def nan_poisoned_empty():
    """Inside the block every floating torch.empty/empty_like is NaN-filled, so an output element a kernel
    launcher allocates but never writes shows up as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(fn):
        def make(*a, **k):
            t = fn(*a, **k)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return make

    torch.empty, torch.empty_like = poisoned(real_empty), poisoned(real_empty_like)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def fast_and_reference_debug_models(**fast_kwargs):
    """LaMamba-debug (128 px, 10 classes) on CUDA built with ``fast_kwargs`` (the backends under test), its weights
    moved off their initial values, and the same weights in a model on the reference kernels."""
    from lamamba_dist.models import create_model

    torch.manual_seed(0)
    common = dict(resolution=128, num_classes=10, class_dropout=0.0)
    fast = create_model("LaMamba-debug", **common, **fast_kwargs).cuda()
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref = create_model("LaMamba-debug", **common, scan_backend="reference", attn_backend="reference",
                       conv_backend="torch").cuda()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def assert_models_match(fast, ref, dtype) -> None:
    """One forward/backward of two LaMamba models with the same weights on CUDA (bf16 autocast when dtype is
    bf16, the same mode for both): output and every parameter grad within the kernel parity tolerances."""
    s = fast.latent_size
    x = torch.randn(4, 4, s, s, device="cuda")
    t = torch.tensor([1, 250, 500, 999], device="cuda")
    y = torch.tensor([0, 3, 7, 9], device="cuda")
    outs, grads = [], []
    for m in (fast, ref):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = m(x, t, y)
        out.float().square().mean().backward()
        outs.append(out.float())
        grads.append({n: p.grad.float() for n, p in m.named_parameters()})
    # the reference runs in the same autocast mode: differences come only from kernels / summation order
    err = ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()
    print(f"{dtype}: output rel max err {err:.2e}")
    assert err < (1e-4 if dtype == torch.float32 else 3e-2)
    worst = 0.0
    for n, g in grads[1].items():
        scale = g.abs().max().clamp(min=1e-3)
        worst = max(worst, ((grads[0][n] - g).abs().max() / scale).item())
    print(f"{dtype}: worst grad rel err {worst:.2e}")
    assert worst < (1e-3 if dtype == torch.float32 else 1e-1)


def ss2d_run(module, u, seed=1):
    """Output and every grad (input and parameters, by the module's own parameter names) of an SS2D forward with a
    fixed random output gradient; works on the module's torch.compile wrapper too."""
    u = u.detach().clone().requires_grad_()
    out = module(u)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, [u, *module.parameters()], gy)
    names = [n.removeprefix("_orig_mod.") for n, _ in module.named_parameters()]  # torch.compile's wrapper
    return out, dict(zip(["input", *names], grads))


def assert_compiles_like_eager(module, u) -> None:
    """torch.compile(fullgraph=True, backend="aot_eager") traces ``module`` through the custom ops with no graph
    break, and gives eager's output and grads."""
    out_e, g_e = ss2d_run(module, u)
    out_c, g_c = ss2d_run(torch.compile(module, fullgraph=True, backend="aot_eager"), u)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    for name, g in g_e.items():
        torch.testing.assert_close(g_c[name], g, rtol=1e-6, atol=1e-6)
