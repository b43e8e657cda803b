"""Selective scan (the Mamba recurrence, docs/model.md §3, step 6), fused CUDA kernel and pure-PyTorch reference.

Shapes (mamba-ssm's convention, grouped B/C as VMamba uses them):

    u, delta      (batch, dim, L)         dim = K*D: the four directions stacked k-major
    A             (dim, N)                fp32, A = -exp(A_logs)
    B, C          (batch, G, N, L)        G = K groups: B_k / C_k shared by the D channels of direction k
    D             (dim,)                  fp32 skip
    delta_bias    (dim,)                  fp32

For step s with h_{-1} = 0:  Δ = softplus(delta + bias);  h_s = exp(Δ A) h_{s-1} + Δ B_s u_s;
y_s = C_s · h_s + D u_s.  The result has u's dtype; the state is always computed in fp32.

``selective_scan`` is the one dispatch point. On CUDA, "auto" (= "mixed") runs the Triton kernel specialised for
d_state 1 (scan_triton.py, custom ops ``lamamba::scan1_fwd/bwd``) on sequences of at most MIXED_TRITON_MAX_LENGTH
steps and mamba-ssm's ``selective_scan_cuda`` kernel (custom ops ``lamamba::selective_scan_fwd/bwd``) on longer
ones, either one alone where the other is missing; the reference off CUDA. "fused" and "triton" force one kernel
(A/B runs). Both custom ops let torch.compile trace through without a graph break. The split is by measurement:
the Triton kernel beat mamba-ssm's at L = 1024, 256 and 64 and lost at 4096 (lamamba_dist/bench/kernels.py), and
the whole compiled training step was fastest with it (docs/performance.md).

``ss2d_scan`` is SS2D's four-direction scan read straight from the channels-last grid (no cross_scan /
cross_merge): the opt-in backends "ss2d_triton" (ss2d_triton.py, custom ops ``lamamba::ss2d_scan_fwd/bwd``) and
"ss2d_reference" (``ss2d_scan_reference``), which change SS2D's layout (models/lamamba.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lamamba_dist.ops.optional_kernels import triton_module


def selective_scan_reference(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus: bool = True):
    """The recurrence, literally, in fp32 (slow: a Python loop over L)."""
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # ln(1+e^v), returns v for v > 20 (torch's threshold)
    batch, dim, length = u.shape
    n = A.shape[1]
    groups = B.shape[1]
    rep = dim // groups
    Bf = B.float().repeat_interleave(rep, dim=1)  # (batch, dim, N, L)
    Cf = C.float().repeat_interleave(rep, dim=1)
    deltaA = torch.exp(delta.unsqueeze(2) * A.float().view(1, dim, n, 1))  # (batch, dim, N, L)
    deltaB_u = delta.unsqueeze(2) * Bf * u.unsqueeze(2)
    h = u.new_zeros(batch, dim, n)
    ys = []
    for s in range(length):
        h = deltaA[..., s] * h + deltaB_u[..., s]
        ys.append((h * Cf[..., s]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.float()[:, None]
    return y.to(dtype_in)


# ----------------------------------------------------------------------------- fused kernel


def _load_cuda_module():
    """mamba-ssm's compiled kernel module, or None (it only exists in a CUDA build of mamba-ssm)."""
    try:
        import selective_scan_cuda  # noqa: F401  (installed by the mamba-ssm wheel, top level)

        return selective_scan_cuda
    except Exception:
        return None


# Resolved once at import: a plain global is a constant to torch.compile (no tracing of the import).
_SCAN_CUDA = _load_cuda_module()


def _cuda_module():
    return _SCAN_CUDA


def fused_available() -> bool:
    return torch.cuda.is_available() and _cuda_module() is not None


def _n_chunks(length: int) -> int:
    return (length + 2048 - 1) // 2048  # mamba-ssm's kernel stores one state per 2048-step chunk


@torch.library.custom_op("lamamba::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, states, *_ = _cuda_module().fwd(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    return out, states


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus):
    batch, dim, length = u.shape
    states = u.new_empty(batch, dim, _n_chunks(length), A.shape[1] * 2, dtype=A.dtype)
    return torch.empty_like(delta), states


@torch.library.custom_op("lamamba::selective_scan_bwd", mutates_args=())
def _scan_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: torch.Tensor, delta_bias: torch.Tensor, dout: torch.Tensor, states: torch.Tensor,
              delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor, torch.Tensor, torch.Tensor]:
    du, ddelta, dA, dB, dC, dD, dbias, *_ = _cuda_module().bwd(
        u, delta, A, B, C, D, None, delta_bias, dout.contiguous(), states, None, None, delta_softplus, False)
    # The kernel returns fp32 grads for variable B/C; hand back each grad in its input's dtype.
    return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dbias


@_scan_bwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, dout, states, delta_softplus):
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), torch.empty_like(D), torch.empty_like(delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout, dstates):
    u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
    grads = _scan_bwd(u, delta, A, B, C, D, delta_bias, dout, states, ctx.delta_softplus)
    return (*grads, None)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_fused(u, delta, A, B, C, D, delta_bias, delta_softplus: bool = True):
    """mamba-ssm's kernel. u/delta/B/C share one dtype (fp32 or bf16); A, D, delta_bias are fp32."""
    if _cuda_module() is None:
        raise RuntimeError("the fused selective scan needs mamba-ssm built with CUDA (pip install 'lamamba-dist[cuda]')")
    dtype = u.dtype
    u, delta = u.contiguous(), delta.to(dtype).contiguous()
    B, C = B.to(dtype).contiguous(), C.to(dtype).contiguous()
    out, _ = _scan_fwd(u, delta, A.float().contiguous(), B, C, D.float().contiguous(),
                       delta_bias.float().contiguous(), delta_softplus)
    return out


# Resolved once at import, like _SCAN_CUDA. Under TRITON_INTERPRET=1 (set before this import) the kernels
# also run on CPU tensors, which is how they are tested without a GPU.
_SCAN_TRITON = triton_module("scan_triton")


def triton_available() -> bool:
    return _SCAN_TRITON is not None


def selective_scan_triton(u, delta, A, B, C, D, delta_bias, delta_softplus: bool = True):
    """The Triton kernel for d_state N = 1 (A of shape (dim, 1)). Inputs of any float dtype; the output has
    u's dtype and every grad its input's dtype."""
    if _SCAN_TRITON is None:
        raise RuntimeError("the triton selective scan needs triton (it ships with CUDA builds of torch)")
    return _SCAN_TRITON.selective_scan_triton(u, delta, A, B, C, D, delta_bias, delta_softplus)


BACKENDS = ("auto", "triton", "fused", "mixed", "reference", "ss2d_triton", "ss2d_reference")
# "mixed" (= "auto"): on CUDA the Triton d_state-1 kernel for sequences of at most MIXED_TRITON_MAX_LENGTH steps,
# mamba-ssm's kernel for longer ones; either one alone where the other is missing. The length of a block's
# sequences is fixed, so each block always runs the same kernel (torch.compile sees a constant).
MIXED_TRITON_MAX_LENGTH = 1024
# Backends that change SS2D's layout (models/lamamba.py): the scan is gathered from the channels-last grid, with
# no cross_scan / cross_merge (ss2d_scan below). Opt-in only: "auto" never picks them. A plain sequence scan
# called with one of them runs the matching sequence kernel ("triton" / "reference").
SS2D_BACKENDS = ("ss2d_triton", "ss2d_reference")
# LAMAMBA_SCAN_BACKEND=<one of BACKENDS> replaces "auto" everywhere (read once, a constant to torch.compile).
_AUTO_OVERRIDE = os.environ.get("LAMAMBA_SCAN_BACKEND", "").strip() or None
if _AUTO_OVERRIDE is not None and _AUTO_OVERRIDE not in BACKENDS:
    raise ValueError(f"LAMAMBA_SCAN_BACKEND={_AUTO_OVERRIDE!r}: choose one of {', '.join(BACKENDS)}")


def resolve_backend(backend: str) -> str:
    """The backend a call with ``backend`` uses: "auto" becomes LAMAMBA_SCAN_BACKEND when that is set (an
    operator's override, e.g. to rule a kernel out without editing configs)."""
    if backend == "auto":
        return _AUTO_OVERRIDE or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus: bool = True, backend: str = "auto"):
    """The dispatch point. backend: "auto" = "mixed" (on CUDA by sequence length, above; the reference
    otherwise), "fused", "triton" or "reference" ("ss2d_triton" and "ss2d_reference" run "triton" and "reference"
    here)."""
    kernel = scan_kernel(backend, u, A.shape[1])
    if kernel == "fused":
        return selective_scan_fused(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if kernel == "triton":
        return selective_scan_triton(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return selective_scan_reference(u, delta, A, B, C, D, delta_bias, delta_softplus)


def scan_kernel(backend: str, u: torch.Tensor, d_state: int, length: int | None = None) -> str:
    """The sequence-scan kernel that ``selective_scan(..., backend=backend)`` runs for u: "fused", "triton" or
    "reference" (SS2D asks this too, to run the same kernel through its lean-backward core). ``length``: the
    sequence length ("mixed" decides by it; default u's last dimension)."""
    backend = resolve_backend(backend)  # the operator's override of "auto"; an unknown name is an error
    backend = {"ss2d_triton": "triton", "ss2d_reference": "reference"}.get(backend, backend)
    if backend == "reference":
        return "reference"
    if backend in ("auto", "mixed"):  # "auto" is "mixed": the fastest in a whole training step (docs/performance.md)
        length = int(u.shape[-1]) if length is None else int(length)
        triton_fits = u.is_cuda and d_state == 1 and _SCAN_TRITON is not None
        if triton_fits and (length <= MIXED_TRITON_MAX_LENGTH or _cuda_module() is None):
            return "triton"
        return "fused" if u.is_cuda and _cuda_module() is not None else "reference"
    if backend == "fused":
        return "fused"
    if backend == "triton":
        return "triton"
    return "reference"


# ----------------------------------------------------------------------------- SS2D's gathered four-direction scan


_SS2D_TRITON = triton_module("ss2d_triton")


def ss2d_scan_reference(x_cl, delta_cl, B_cl, C_cl, A, D, delta_bias, paths, inverse, delta_softplus: bool = True):
    """ss2d_triton.ss2d_scan in pure PyTorch: gather the four sequences (B, 4, D, L), run
    selective_scan_reference, merge back (y[:, :, p] = sum_k ys[:, k, :, inverse[k, p]]). Returns (B, L, D) in
    x's dtype. Shapes: x_cl (B, L, D), delta_cl (B, L, K, D), B_cl/C_cl (B, L, K[, 1]), A (K*D, 1), D and
    delta_bias (K*D,), paths/inverse (K, L)."""
    batch, length, dim = x_cl.shape
    k = paths.shape[0]
    bs_grid = B_cl.reshape(batch, length, k)
    cs_grid = C_cl.reshape(batch, length, k)
    xs = torch.stack([x_cl[:, paths[i]] for i in range(k)], dim=1).transpose(2, 3)  # (B, K, D, L)
    dts = torch.stack([delta_cl[:, paths[i], i] for i in range(k)], dim=1).transpose(2, 3)  # (B, K, D, L)
    bs = torch.stack([bs_grid[:, paths[i], i] for i in range(k)], dim=1).unsqueeze(2)  # (B, K, 1, L)
    cs = torch.stack([cs_grid[:, paths[i], i] for i in range(k)], dim=1).unsqueeze(2)
    ys = selective_scan_reference(xs.reshape(batch, k * dim, length), dts.reshape(batch, k * dim, length),
                                  A.reshape(k * dim, -1), bs, cs, D, delta_bias, delta_softplus)
    ys = ys.view(batch, k, dim, length).float()
    y = sum(ys[:, i][:, :, inverse[i]] for i in range(k))  # (B, D, L)
    return y.transpose(1, 2).contiguous().to(x_cl.dtype)


def ss2d_triton_available() -> bool:
    return _SS2D_TRITON is not None


def ss2d_scan(x_cl, delta_cl, B_cl, C_cl, A, D, delta_bias, paths, inverse, delta_softplus: bool = True,
              backend: str = "ss2d_triton"):
    """SS2D's four-direction scan (d_state 1) from the channels-last grid: (B, L, D). backend "ss2d_triton" (the
    Triton kernels, ss2d_triton.py) or "ss2d_reference"."""
    if backend == "ss2d_reference":
        return ss2d_scan_reference(x_cl, delta_cl, B_cl, C_cl, A, D, delta_bias, paths, inverse, delta_softplus)
    if backend != "ss2d_triton":
        raise ValueError(f"ss2d_scan backend must be one of {', '.join(SS2D_BACKENDS)}, got {backend!r}")
    if _SS2D_TRITON is None:
        raise RuntimeError("the ss2d_triton scan backend needs triton (it ships with CUDA builds of torch)")
    return _SS2D_TRITON.ss2d_scan(x_cl, delta_cl, B_cl, C_cl, A, D, delta_bias, paths, inverse, delta_softplus)
