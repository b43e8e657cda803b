"""Times the selective scan for d_state 1 on one GPU: mamba-ssm's selective_scan_cuda (the "fused" backend, when
it imports) against the Triton kernels (scan_triton.py), forward and forward+backward, bf16, at the shapes of
LaMamba-Diff's SS2D (G = 4 directions, dim = 4 * d_inner):

    batch 64, dim 2560, L 1024   (256px, stage 1)
    batch 64, dim 5120, L 256    (256px, stage 2)
    batch 16, dim 2560, L 4096   (512px, stage 1)

Also prints the bandwidth the Triton kernels reach, counting the bytes they must move (forward: u, delta read and
y written, 6 bytes an element in bf16; backward: u, delta, dy read and du, ddelta written, 10 bytes), and checks
the two backends agree. ``--sweep`` also times launch configurations of the Triton kernels.

``--ss2d`` compares SS2D's old scan path (cross_scan of the (B, D, H, W) map, the sequence scan over (B, 4D, L) by
mamba-ssm's kernel and/or scan_triton, cross_merge, the transpose to channels-last) with the gathered scan
(ss2d_triton.py: channels-last x (B, L, D), delta (B, L, 4, D), no cross_scan / cross_merge), forward and
forward+backward, bf16, and then whole SS2D modules (bf16 autocast) with those scan backends, at LaMamba-XL's
shapes (batch, d_inner, map side): 64 x 640 x 32x32, 64 x 1280 x 16x16, 16 x 640 x 64x64. ``--ss2d-sweep`` also
times launch configurations of the gathered kernels.

    python scripts/bench_scan.py [--sweep] [--shapes 64x2560x1024,...]
    python scripts/bench_scan.py --ss2d [--ss2d-sweep] [--ss2d-shapes 64x640x32,...]
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
SS2D_SHAPES = [(64, 640, 32), (64, 1280, 16), (16, 640, 64)]  # batch, d_inner, map side
GROUPS = 4
DEVICE = "cuda"  # the --ss2d functions take it from here (a CPU smoke test under TRITON_INTERPRET=1 sets "cpu")


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


# ----------------------------------------------------------------------------- SS2D: old path vs gathered scan


def make_ss2d_inputs(batch, dim, n, dtype=torch.bfloat16, seed=0):
    """Grid-layout inputs of ss2d_scan: x (B, L, D), delta (B, L, 4, D), B/C (B, L, 4), A (4D, 1), D, bias (4D,)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    mk = lambda *s, scale=1.0: torch.randn(*s, generator=g, device=DEVICE) * scale  # noqa: E731
    length = n * n
    x = mk(batch, length, dim).to(dtype)
    delta = mk(batch, length, GROUPS, dim, scale=0.5).to(dtype)
    B = mk(batch, length, GROUPS).to(dtype)
    C = mk(batch, length, GROUPS).to(dtype)
    A = -torch.exp(mk(GROUPS * dim, 1, scale=0.5))
    D = mk(GROUPS * dim)
    bias = mk(GROUPS * dim, scale=0.5) - 2.0
    return [x, delta, B, C, A, D, bias]


def old_layout(args, n, tables):
    """The same numbers in the unfused path's layout: x (B, D, n, n) and the per-direction sequences
    delta (B, 4D, L), B/C (B, 4, 1, L) (the old path's projections would produce those directly)."""
    x, delta, B, C, A, D, bias = args
    paths = tables[0]
    batch, length, dim = x.shape
    x_map = x.transpose(1, 2).reshape(batch, dim, n, n).contiguous()
    ds = torch.stack([delta[:, paths[k], k].transpose(1, 2) for k in range(GROUPS)], 1)
    bs = torch.stack([B[:, paths[k], k] for k in range(GROUPS)], 1).unsqueeze(2).contiguous()
    cs = torch.stack([C[:, paths[k], k] for k in range(GROUPS)], 1).unsqueeze(2).contiguous()
    return [x_map, ds.reshape(batch, GROUPS * dim, length).contiguous(), bs, cs, A, D, bias]


def old_ss2d_scan(scan, n, tables):
    """cross_scan -> sequence scan over (B, 4D, L) -> cross_merge -> channels-last (B, L, D), as SS2D does it."""
    from lamamba_dist.ops.cross_scan import cross_merge, cross_scan

    def run(x_map, delta, B, C, A, D, bias):
        batch, dim = x_map.shape[:2]
        xs = cross_scan(x_map, tables)
        ys = scan(xs.view(batch, GROUPS * dim, n * n), delta, A, B, C, D, bias)
        y = cross_merge(ys.view(batch, GROUPS, dim, n * n), n, tables)
        return y.transpose(1, 2).contiguous()

    return run


def ss2d_bench(shapes, do_sweep):
    from lamamba_dist.models.lamamba import SS2D
    from lamamba_dist.ops import ss2d_triton as sst
    from lamamba_dist.ops.cross_scan import snake_tables

    have_mamba = _cuda_module() is not None
    print("\nSS2D scan: old path (cross_scan + sequence scan + cross_merge + transpose) vs the gathered scan, bf16")
    header = f"{'batch x D x map':>18} | {'path':>24} | {'fwd ms':>7} | {'fwd+bwd ms':>10} | {'vs old':>6}"
    print(header)
    print("-" * len(header))
    for batch, dim, n in shapes:
        tables = snake_tables(n, DEVICE)
        args = make_ss2d_inputs(batch, dim, n)
        old_args = old_layout(args, n, tables)
        gy = torch.randn(batch, n * n, dim, device=DEVICE, dtype=torch.bfloat16)
        label = f"{batch}x{dim}x{n}x{n}"
        rows = []
        olds = [("old + triton scan", st.selective_scan_triton)]
        if have_mamba:
            olds.insert(0, ("old + mamba scan", selective_scan_fused))
        for name, scan in olds:
            rows.append((name, *time_backend(old_ss2d_scan(scan, n, tables), old_args, gy)))
        new = lambda *a: sst.ss2d_scan(*a, tables[0], tables[1])  # noqa: E731
        rows.append(("gathered ss2d_triton", *time_backend(new, args, gy)))
        base = rows[0][2]
        for name, fwd, fb in rows:
            print(f"{label:>18} | {name:>24} | {fwd:7.3f} | {fb:10.3f} | {base / fb:5.2f}x")
        # the two layouts compute the same function: compare outputs and the grads they share
        res = []
        for fn, a in ((old_ss2d_scan(st.selective_scan_triton, n, tables), old_args), (new, args)):
            leaves = [t.detach().requires_grad_() for t in a]
            out = fn(*leaves)
            gx, gA, gD, gbias = torch.autograd.grad(out, [leaves[0], leaves[4], leaves[5], leaves[6]], gy)
            res.append([out, gx.reshape(batch, dim, n * n).transpose(1, 2) if gx.dim() == 4 else gx, gA, gD, gbias])
        diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()
                   for a, b in zip(*res))
        print(f"{'':>18}   max rel diff gathered vs old (out, dx, dA, dD, dbias): {diff:.2e}")
        if do_sweep:
            ss2d_sweep(args, gy, tables)
        del args, old_args, gy
        torch.cuda.empty_cache()

    print("\nWhole SS2D module (in_proj ... out_proj), bf16 autocast, fwd+bwd, by scan backend")
    header = f"{'batch x D x map':>18} | {'scan_backend':>12} | {'fwd ms':>7} | {'fwd+bwd ms':>10}"
    print(header)
    print("-" * len(header))
    for batch, dim, n in shapes:
        torch.manual_seed(0)
        module = SS2D(dim // 2, resolution=n).to(DEVICE)  # d_inner = 2 * dim of the block
        module.reset_ssm_parameters()
        u = torch.randn(batch, n, n, dim // 2, device=DEVICE, requires_grad=True)
        for backend in (["fused"] if have_mamba else []) + ["triton", "ss2d_triton"]:
            module.scan_backend = backend

            def fwd():
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    return module(u)

            with torch.no_grad():
                t_fwd = bench(fwd)
            t_fb = bench(lambda: fwd().float().square().mean().backward())
            print(f"{f'{batch}x{dim}x{n}x{n}':>18} | {backend:>12} | {t_fwd:7.3f} | {t_fb:10.3f}")
        del module, u
        torch.cuda.empty_cache()


def ss2d_sweep(args, gy, tables):
    from lamamba_dist.ops import ss2d_triton as sst

    x, delta, B, C, A, D, bias = args
    A = A.reshape(-1)
    paths = tables[0]
    length = x.shape[1]
    rows = []
    for sub_d, tile in itertools.product([8, 16, 32], [1024, 2048, 4096]):
        chunk = min(triton.next_power_of_2(length), tile // sub_d)
        _, states = sst.ss2d_fwd_launch(x, delta, B, C, A, D, bias, paths, True, chunk, sub_d=sub_d)
        for nw in [2, 4, 8]:
            try:
                t = bench(lambda: sst.ss2d_fwd_launch(x, delta, B, C, A, D, bias, paths, True, chunk, sub_d=sub_d,
                                                      num_warps=nw))
                rows.append(("fwd", t, f"sub_d={sub_d:<3d} chunk={chunk:<5d} warps={nw:<3d}"))
            except Exception as e:  # noqa: BLE001  (out of resources, say)
                print(f"  fwd sub_d={sub_d} chunk={chunk} warps={nw}: {type(e).__name__}")
        for nw in [4, 8, 16]:
            try:
                t = bench(lambda: sst.ss2d_bwd_launch(x, delta, B, C, A, D, bias, paths, gy, states, True, chunk,
                                                      sub_d=sub_d, num_warps=nw))
                rows.append(("bwd", t, f"sub_d={sub_d:<3d} chunk={chunk:<5d} warps={nw:<3d}"))
            except Exception as e:  # noqa: BLE001
                print(f"  bwd sub_d={sub_d} chunk={chunk} warps={nw}: {type(e).__name__}")
    for kind in ("fwd", "bwd"):
        for r in sorted((r for r in rows if r[0] == kind), key=lambda r: r[1])[:6]:
            print(f"  {kind} {r[2]}  {r[1] * 1e3:8.1f} us")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also time launch configurations of the triton kernels")
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                   help="batch x dim x L, comma separated")
    p.add_argument("--ss2d", action="store_true",
                   help="compare SS2D's old scan path with the gathered ss2d_triton scan (instead of the sequence scans)")
    p.add_argument("--ss2d-sweep", action="store_true", help="with --ss2d: time launch configurations of its kernels")
    p.add_argument("--ss2d-shapes", default=",".join("x".join(map(str, s)) for s in SS2D_SHAPES),
                   help="batch x d_inner x map side, comma separated")
    a = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    have_mamba = _cuda_module() is not None
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"mamba selective_scan_cuda: {'yes' if have_mamba else 'no'}")
    if a.ss2d:
        ss2d_bench([tuple(int(v) for v in s.split("x")) for s in a.ss2d_shapes.split(",")], a.ss2d_sweep)
        return
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
