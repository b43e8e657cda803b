"""The snake gather and merge between the channels-last map and the four sequences, in Triton.

SS2D's blocks are channels-last (B, L, D); the sequence scan wants (B, 4, D, L) with the steps contiguous. The two
layout changes at the ends of SS2D's scan core (lamamba_dist/ops/ss2d_core.py) are

    gather_cl   x_cl (B, L, D) -> xs (B, 4, D, L):   xs[b, k, d, s] = x_cl[b, paths[k, s], d]
    merge_cl    ys (B, 4, D, L) -> y_cl (B, L, D):   y_cl[b, p, d] = sum_k ys[b, k, d, inverse[k, p]]

each the other's adjoint (paths[k] and inverse[k] are inverse permutations, cross_scan.py). Done with torch ops,
each is a gather along L fused with a transpose, which the compiler emits as one kernel whose reads (or writes)
are a channel stride apart: every 2-byte element in its own memory sector. Here a program owns a tile of steps
(or positions) x channels and both of its sides move in contiguous runs:

* gather_cl: a tile of BLOCK_S consecutive steps of one direction x BLOCK_D channels. Each step reads one grid
  row's BLOCK_D adjacent channels; the tile is written along s, contiguous in xs (Triton transposes the tile
  through shared memory between the two).
* merge_cl: a tile of BLOCK_R x BLOCK_C grid positions (a square patch of the map) x BLOCK_D channels, written as
  BLOCK_R * BLOCK_C rows of BLOCK_D adjacent channels. A snake visits each row (k = 0, 1) or column (k = 2, 3) of
  the patch as consecutive steps, so every read of direction k is a run of BLOCK_C (or BLOCK_R) adjacent steps
  rather than a single scattered element. The four directions are summed in fp32 in registers.

Exposed as the custom ops ``lamamba::snake_gather_cl`` / ``lamamba::snake_merge_cl`` (fake kernels + autograd, each
the other's backward), so torch.compile traces through them, and as ``gather_cl`` / ``merge_cl``. The pure-PyTorch
equivalents are ``gather_cl_reference`` / ``merge_cl_reference`` in cross_scan.py (importable without triton).

Importing this module imports triton (cross_scan.py imports it guarded). Under TRITON_INTERPRET=1, set before the
import, the kernels run on CPU tensors through Triton's interpreter: that is how they are tested on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

K_DIRS = 4
# (steps, channels, warps) of gather_cl's tile and (patch side, channels, warps, transposed) of merge_cl's: 64 bf16
# channels = 128 bytes, a whole cache line per grid row; ``transposed`` runs _merge_cl_t_kernel, whose tile is
# (channels, positions). The merge's 32 channels: on one H200 (2026-12-07) 0.193 ms against 0.263 with 64 at
# 64 x 640 x 32 (batch x d_inner x side), 0.090 against 0.115 at 64 x 1280 x 16; the transposed tile was faster on
# the small maps (0.084 at 16, 0.043 against 0.051 at 8) and slower on the large ones (0.232 at 32, 0.282 against
# 0.227 at 16 x 640 x 64), slower over LaMamba-XL's blocks in all.
GATHER_CONFIG = (64, 64, 4)
MERGE_CONFIG = (8, 32, 4, False)
# The merge's configuration by map side where a measured one differs from MERGE_CONFIG (`lamamba bench kernels
# --what snake --sweep` times both tiles at each of LaMamba-XL's map sizes): the transposed tile on 16 channels and
# two warps, on one H100 (2026-12-07) 0.0546 against 0.0607 ms at 64 x 2560 x 8, 0.103 against 0.109 at
# 64 x 1280 x 16, 0.054 against 0.060 at 16 x 2560 x 16 (the fastest of eight configurations at each).
MERGE_LAUNCH: dict[int, tuple] = {8: (8, 16, 2, True), 16: (8, 16, 2, True)}


@triton.jit
def _gather_cl_kernel(x_ptr, paths_ptr, out_ptr, L, D,
                      BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bk = tl.program_id(0)  # b * 4 + k
    k = bk % 4
    b = bk // 4
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    smask = s < L
    mask = smask[:, None] & (d < D)[None, :]
    p = tl.load(paths_ptr + k * L + s, mask=smask, other=0).to(tl.int64)
    v = tl.load(x_ptr + (b.to(tl.int64) * L + p[:, None]) * D + d[None, :], mask=mask)  # (steps, channels)
    out_rows = (bk.to(tl.int64) * D + d[None, :]) * L
    tl.store(out_ptr + out_rows + s[:, None], v, mask=mask)


@triton.jit
def _merge_patch(N, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """A merge program's grid positions (its BLOCK_R x BLOCK_C patch, row-major), their mask, and its channels."""
    n_cblk = tl.cdiv(N, BLOCK_C)
    r0 = (tl.program_id(1) // n_cblk) * BLOCK_R
    c0 = (tl.program_id(1) % n_cblk) * BLOCK_C
    i = tl.arange(0, BLOCK_R * BLOCK_C)
    row = r0 + i // BLOCK_C
    col = c0 + i % BLOCK_C
    return row * N + col, (row < N) & (col < N), tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)


@triton.jit
def _merge_cl_kernel(y_ptr, inverse_ptr, out_ptr, N, L, D,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    p, pmask, d = _merge_patch(N, BLOCK_R, BLOCK_C, BLOCK_D)
    mask = pmask[:, None] & (d < D)[None, :]
    acc = tl.zeros([BLOCK_R * BLOCK_C, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(4):
        s = tl.load(inverse_ptr + k * L + p, mask=pmask, other=0).to(tl.int64)
        rows = ((b * 4 + k).to(tl.int64) * D + d[None, :]) * L
        acc += tl.load(y_ptr + rows + s[:, None], mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + (b.to(tl.int64) * L + p[:, None]) * D + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_cl_t_kernel(y_ptr, inverse_ptr, out_ptr, N, L, D,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # _merge_cl_kernel with the tile transposed, (channels, positions): the reads of ys then run along the
    # positions, which a snake visits as runs of adjacent steps (a patch row for k = 0, 1, a column for k = 2, 3),
    # so a warp's loads fall in a few sectors instead of one channel row each; the store, along the channels, goes
    # through a layout conversion in shared memory.
    b = tl.program_id(0)
    p, pmask, d = _merge_patch(N, BLOCK_R, BLOCK_C, BLOCK_D)
    mask = (d < D)[:, None] & pmask[None, :]
    acc = tl.zeros([BLOCK_D, BLOCK_R * BLOCK_C], dtype=tl.float32)
    for k in tl.static_range(4):
        s = tl.load(inverse_ptr + k * L + p, mask=pmask, other=0).to(tl.int64)
        rows = ((b * 4 + k).to(tl.int64) * D + d[:, None]) * L
        acc += tl.load(y_ptr + rows + s[None, :], mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + (b.to(tl.int64) * L + p[None, :]) * D + d[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _pow2(v: int, what: str) -> int:
    if v < 1 or v & (v - 1):
        raise ValueError(f"snake gather/merge launch config: {what} must be a power of two, got {v}")
    return v


def _side(length: int) -> int:
    n = int(round(length ** 0.5))
    if n * n != length:
        raise ValueError(f"the snake paths need a square map: L = {length} is not a square")
    return n


def _check_tables(table: torch.Tensor, length: int, device) -> torch.Tensor:
    if table.shape != (K_DIRS, length):
        raise ValueError(f"snake table must be ({K_DIRS}, {length}), got {tuple(table.shape)}")
    if table.device != device:
        raise ValueError(f"snake table on {table.device}, tensor on {device}")
    return table.contiguous()


def gather_cl_launch(x_cl: torch.Tensor, paths: torch.Tensor, config=None) -> torch.Tensor:
    """x_cl (B, L, D) -> (B, 4, D, L) contiguous, xs[b, k, d, s] = x_cl[b, paths[k, s], d]. ``config``: (steps,
    channels, warps) per program (default GATHER_CONFIG)."""
    if x_cl.dim() != 3:
        raise ValueError(f"gather_cl: x must be (B, L, D), got shape {tuple(x_cl.shape)}")
    b, length, d = x_cl.shape
    paths = _check_tables(paths, length, x_cl.device)
    bs, bd, nw = (config or GATHER_CONFIG)
    bs, bd, nw = _pow2(bs, "steps"), _pow2(bd, "channels"), _pow2(nw, "warps")
    x_cl = x_cl.contiguous()
    out = torch.empty(b, K_DIRS, d, length, device=x_cl.device, dtype=x_cl.dtype)
    grid = (b * K_DIRS, triton.cdiv(length, bs), triton.cdiv(d, bd))
    _gather_cl_kernel[grid](x_cl, paths, out, length, d, BLOCK_S=bs, BLOCK_D=bd, num_warps=nw)
    return out


def merge_cl_launch(ys: torch.Tensor, inverse: torch.Tensor, config=None) -> torch.Tensor:
    """ys (B, 4, D, L) -> (B, L, D) contiguous, y_cl[b, p, d] = sum_k ys[b, k, d, inverse[k, p]], summed in fp32,
    returned in ys' dtype. ``config``: (patch side, channels, warps[, transposed]) per program (default
    MERGE_LAUNCH's entry for the map's side, else MERGE_CONFIG; transposed: the (channels, positions) tile of
    _merge_cl_t_kernel)."""
    if ys.dim() != 4 or ys.shape[1] != K_DIRS:
        raise ValueError(f"merge_cl: ys must be (B, {K_DIRS}, D, L), got shape {tuple(ys.shape)}")
    b, _, d, length = ys.shape
    n = _side(length)
    inverse = _check_tables(inverse, length, ys.device)
    side, bd, nw, *rest = (config or MERGE_LAUNCH.get(n, MERGE_CONFIG))
    transposed = bool(rest[0]) if rest else False
    side, bd, nw = _pow2(side, "patch side"), _pow2(bd, "channels"), _pow2(nw, "warps")
    side = min(side, triton.next_power_of_2(n))
    ys = ys.contiguous()
    out = torch.empty(b, length, d, device=ys.device, dtype=ys.dtype)
    n_blk = triton.cdiv(n, side)
    grid = (b, n_blk * n_blk, triton.cdiv(d, bd))
    kernel = _merge_cl_t_kernel if transposed else _merge_cl_kernel
    kernel[grid](ys, inverse, out, n, length, d, BLOCK_R=side, BLOCK_C=side, BLOCK_D=bd, num_warps=nw)
    return out


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("lamamba::snake_gather_cl", mutates_args=())
def _gather_cl(x_cl: torch.Tensor, paths: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return gather_cl_launch(x_cl, paths)


@_gather_cl.register_fake
def _(x_cl, paths, inverse):
    b, length, d = x_cl.shape
    return x_cl.new_empty(b, K_DIRS, d, length)


@torch.library.custom_op("lamamba::snake_merge_cl", mutates_args=())
def _merge_cl(ys: torch.Tensor, paths: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return merge_cl_launch(ys, inverse)


@_merge_cl.register_fake
def _(ys, paths, inverse):
    b, _, d, length = ys.shape
    return ys.new_empty(b, length, d)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _gather_backward(ctx, grad):
    paths, inverse = ctx.saved_tensors
    return _merge_cl(grad, paths, inverse), None, None


def _merge_backward(ctx, grad):
    paths, inverse = ctx.saved_tensors
    return _gather_cl(grad, paths, inverse), None, None


_gather_cl.register_autograd(_gather_backward, setup_context=_setup_context)
_merge_cl.register_autograd(_merge_backward, setup_context=_setup_context)


def gather_cl(x_cl: torch.Tensor, paths: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (B, 4, D, L) along the snake paths (custom op; its backward is merge_cl)."""
    return _gather_cl(x_cl, paths, inverse)


def merge_cl(ys: torch.Tensor, paths: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, 4, D, L) -> (B, L, D), the four directions summed at their grid positions (custom op; its backward is
    gather_cl)."""
    return _merge_cl(ys, paths, inverse)
