"""Times the selective scan for d_state 1 on one GPU: mamba-ssm's selective_scan_cuda (the "fused" backend, when
it imports) against the Triton kernels (scan_triton.py), forward and forward+backward, bf16, at the shapes of
LaMamba-Diff's SS2D (G = 4 directions, dim = 4 * d_inner):

    batch 64, dim 2560, L 1024   (256px, stage 1)
    batch 64, dim 5120, L 256    (256px, stage 2)
    batch 16, dim 2560, L 4096   (512px, stage 1)

Also prints the bandwidth the Triton kernels reach, counting the bytes they must move (forward: u, delta read and
y written, 6 bytes an element in bf16; backward: u, delta, dy read and du, ddelta written, 10 bytes), and checks
the two backends agree. ``--sweep`` also times launch configurations of the Triton kernels.

    python scripts/bench_scan.py [--sweep] [--shapes 64x2560x1024,...]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.testing

from lamamba_dist.ops import scan_triton as st
from lamamba_dist.ops.selective_scan import _cuda_module, selective_scan_fused

SHAPES = [(64, 2560, 1024), (64, 5120, 256), (16, 2560, 4096)]
GROUPS = 4


def make_inputs(batch, dim, length, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s, scale=1.0: torch.randn(*s, generator=g, device="cuda") * scale  # noqa: E731
    u = mk(batch, dim, length).to(dtype)
    delta = mk(batch, dim, length, scale=0.5).to(dtype)
    A = -torch.exp(mk(dim, 1, scale=0.5))
    B = mk(batch, GROUPS, 1, length).to(dtype)
    C = mk(batch, GROUPS, 1, length).to(dtype)
    D = mk(dim)
    bias = mk(dim, scale=0.5) - 2.0
    return [u, delta, A, B, C, D, bias]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50)


def time_backend(scan, args, gy):
    leaves = [a.detach().requires_grad_() for a in args]
    with torch.no_grad():
        fwd = bench(lambda: scan(*args))

    def fwd_bwd():
        out = scan(*leaves)
        torch.autograd.grad(out, leaves, gy)

    return fwd, bench(fwd_bwd)


def agree(args, gy):
    """Max relative difference (to the max magnitude) of the output and 7 grads, triton vs mamba."""
    res = []
    for scan in (st.selective_scan_triton, selective_scan_fused):
        leaves = [a.detach().requires_grad_() for a in args]
        out = scan(*leaves)
        res.append([out, *torch.autograd.grad(out, leaves, gy)])
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()
               for a, b in zip(*res))


def sweep(args, gy):
    u, delta, A, B, C, D, bias = args
    batch, dim, length = u.shape
    rep = dim // GROUPS
    chunk = st.default_chunk(length)
    n_chunks = triton.cdiv(length, chunk)
    elems = u.numel()
    _, states = st.scan1_fwd_launch(u, delta, A, B, C, D, bias, True, chunk)
    rows = []
    for sub_d, nw in itertools.product([1, 2, 4, 8], [1, 2, 4, 8]):
        if rep % sub_d or sub_d * chunk > 8192 or sub_d * chunk < 256:
            continue
        try:
            t = bench(lambda: st.scan1_fwd_launch(u, delta, A, B, C, D, bias, True, chunk, sub_d=sub_d, num_warps=nw))
        except Exception as e:  # noqa: BLE001  (out of resources, say)
            print(f"  fwd sub_d={sub_d} warps={nw}: {type(e).__name__}")
            continue
        rows.append(("fwd", t, f"sub_d={sub_d:<3d} warps={nw:<3d}", 6 * elems / t / 1e6))
    for sub_d, dblk, nw in itertools.product([1, 2, 4], [16, 64], [1, 2, 4]):
        nsub = 1 if n_chunks > 1 else dblk // sub_d
        if rep % (sub_d * nsub) or sub_d * chunk > 16384 or sub_d * chunk < 256 or (n_chunks > 1 and dblk > 16):
            continue
        try:
            t = bench(lambda: st.scan1_bwd_launch(u, delta, A, B, C, D, bias, gy, states, True, chunk,
                                                  sub_d=sub_d, nsub=nsub, num_warps=nw))
        except Exception as e:  # noqa: BLE001
            print(f"  bwd sub_d={sub_d} nsub={nsub} warps={nw}: {type(e).__name__}")
            continue
        rows.append(("bwd", t, f"sub_d={sub_d:<3d} nsub={nsub:<3d} warps={nw:<3d}", 10 * elems / t / 1e6))
    for kind in ("fwd", "bwd"):
        best = sorted((r for r in rows if r[0] == kind), key=lambda r: r[1])[:6]
        for r in best:
            print(f"  {kind} {r[2]}  {r[1] * 1e3:8.1f} us  {r[3]:7.0f} GB/s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also time launch configurations of the triton kernels")
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                   help="batch x dim x L, comma separated")
    a = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    have_mamba = _cuda_module() is not None
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"mamba selective_scan_cuda: {'yes' if have_mamba else 'no'}")
    header = (f"{'batch x dim x L':>18} | {'backend':>7} | {'fwd ms':>7} | {'fwd+bwd ms':>10} | {'bwd ms':>7} | "
              f"{'fwd GB/s':>8} | {'bwd GB/s':>8}")
    print(header)
    print("-" * len(header))
    for batch, dim, length in shapes:
        args = make_inputs(batch, dim, length)
        gy = torch.randn(batch, dim, length, device="cuda", dtype=torch.bfloat16)
        elems = batch * dim * length
        backends = [("triton", st.selective_scan_triton)] + ([("mamba", selective_scan_fused)] if have_mamba else [])
        for name, scan in backends:
            fwd, fb = time_backend(scan, args, gy)
            bwd = fb - fwd
            print(f"{f'{batch}x{dim}x{length}':>18} | {name:>7} | {fwd:7.3f} | {fb:10.3f} | {bwd:7.3f} | "
                  f"{6 * elems / fwd / 1e6:8.0f} | {10 * elems / bwd / 1e6:8.0f}")
        if have_mamba:
            print(f"{'':>18}   max rel diff triton vs mamba (out + 7 grads): {agree(args, gy):.2e}")
        if a.sweep:
            sweep(args, gy)
        del args, gy
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
