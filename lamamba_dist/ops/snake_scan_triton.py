"""SS2D's scan core for short sequences in one kernel each way: the snake gather, the four scans and the merge.

For a map whose sequences fit one tile, ss2d_core.py (with ``snake="fused"``) replaces the forward, up to
FWD_MAX_LENGTH steps, and the backward, up to MAX_LENGTH, of what it otherwise runs as

    forward:  xs = gather_cl(x)  ->  scan(xs, dts)  ->  y = merge_cl(ys)
    backward: xs = gather_cl(x), gout = gather_cl(gy)  ->  scan backward  ->  gx = merge_cl(du)

as five layout kernels around the two scans, each moving a (B, 4, D, L) tensor, four times the map, through memory.
Here one program owns SUB_D channels of one batch row and runs the four directions one after the other:

* it reads x (and in the backward gy) straight from the channels-last map at the grid positions the direction
  visits, ``x[b, paths[k, s], c]``: every step is a run of SUB_D adjacent channels, and the four directions read
  the same map (once from memory, then from L2);
* the deltas (B, 4, D, L), B and C (B, 4, 1, L) are read in sequence order as the scan kernel reads them, and the
  backward writes the deltas' gradient over them in the same layout;
* the direction's output (the backward: its input gradient) is put back in grid order in registers,
  ``tl.gather(y_k, inverse[k], axis=0)``, and summed over the four directions in fp32: the program then writes
  its channels of y (of gx) channels-last once, rounded once.

The whole sequence is one tile, so no state crosses a chunk and the forward keeps none for the backward
(h is recomputed from zero). The recurrence and its backward are scan_triton.py's (its docstring has the
derivation; the combine functions and softplus are shared), here along axis 0 of an (L, SUB_D) tile. The sums
over steps (gA, gD, gbias) are per program and the sums over channels (gB, gC) per (program, direction, step), in
fp32 buffers that torch reduces in a fixed order: deterministic, no atomics.

``snake_scan_fwd`` / ``snake_scan_bwd`` are called inside ss2d_core's custom ops (eagerly); the pure-PyTorch
equivalent is the unfused path itself (gather, the reference recurrence, merge), which the tests compare against
(tests/ops/test_snake_scan_triton.py). Importing this module imports triton; under TRITON_INTERPRET=1 (set before
the import) the kernels run on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lamamba_dist.ops.scan_triton import _add3, _dt_and_slope, _fwd_combine, _fwd_prev_combine, _rev_combine

K_DIRS = 4
# With the model setting ``snake_backend = "fused"``: the longest sequence ss2d_core runs through these kernels both
# ways, and through the forward kernel alone (its backward then the unfused kernels, from a zero entry state: the
# whole sequence is one tile). The tile of a program is (L, SUB_D). On one H100 (2026-12-07, bf16, batch x d_inner
# x map side, docs/performance.md) the fused forward took 0.145 ms against the unfused path's 0.218 at
# 64 x 2560 x 8, 0.361 against 0.421 at 64 x 1280 x 16 and 0.187 against 0.216 at 16 x 2560 x 16, but the fused
# backward 0.817 against 0.440, 2.41 against 0.81 and 1.26 against 0.43: so the forward alone, up to 16x16 maps.
MAX_LENGTH = 0
FWD_MAX_LENGTH = 256
# Launch configurations, (channels a program, warps, stages), by sequence length; other lengths: the defaults.
# ``stages`` > 1 software-pipelines the loop over the four directions (the next direction's tiles are fetched
# while this one is scanned). Compiled for sm_90 at L 64 (Triton's ptxas on CPU), the backward holds about 30
# fp32 registers per element of its tile a thread: 4 elements (16 channels, 8 warps) take 127 registers, 8
# elements 215-255, so the defaults keep the backward's tile at 4 elements a thread.
FWD_LAUNCH: dict[int, tuple[int, int, int]] = {64: (16, 4, 1), 256: (8, 4, 1)}  # the fastest of 6 and 4 (H100)
BWD_LAUNCH: dict[int, tuple[int, int, int]] = {64: (8, 4, 1), 256: (16, 16, 1)}
FWD_DEFAULT = (16, 4, 2)
BWD_DEFAULT = (16, 8, 1)


@triton.jit
def _program(L, dim, n_blk, SUB_D: tl.constexpr, LP: tl.constexpr):
    """A program's batch row, block of channels, steps (as positions: the grid's rows in order), their masks and
    the batch row's first grid row."""
    pid = tl.program_id(0)
    j = pid % n_blk
    b = pid // n_blk
    ch = j * SUB_D + tl.arange(0, SUB_D)
    cmask = ch < dim
    s = tl.arange(0, LP)
    smask = s < L
    return b, j, ch, cmask, s, smask, smask[:, None] & cmask[None, :], b.to(tl.int64) * L


@triton.jit
def _direction(x_ptr, gy_ptr, delta_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, paths_ptr, k, b, ch, cmask, s, smask,
               mask, map_rows, L, dim, SOFTPLUS: tl.constexpr, WITH_GY: tl.constexpr):
    """Direction k's inputs for the program's channels: u = x (and with WITH_GY the output gradient) read along the
    path, delta (+ bias) in sequence order, B, C, the parameters; and dt, its slope, a = exp(dt A), b u = dt B u
    (fp32)."""
    kd = k * dim + ch
    A = tl.load(A_ptr + kd, mask=cmask, other=0.0)
    Dv = tl.load(D_ptr + kd, mask=cmask, other=0.0)
    bias = tl.load(bias_ptr + kd, mask=cmask, other=0.0)
    p = tl.load(paths_ptr + k * L + s, mask=smask, other=0).to(tl.int64)  # the grid row of step s
    seq = (b * 4 + k).to(tl.int64)
    map_offs = (map_rows + p)[:, None] * dim + ch[None, :]
    seq_offs = (seq * dim + ch)[None, :] * L + s[:, None]
    u = tl.load(x_ptr + map_offs, mask=mask, other=0.0).to(tl.float32)
    if WITH_GY:  # y = sum_k y_k: every direction's output gradient is gy
        gy = tl.load(gy_ptr + map_offs, mask=mask, other=0.0).to(tl.float32)
    else:
        gy = u
    x = tl.load(delta_ptr + seq_offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
    Bv = tl.load(B_ptr + seq * L + s, mask=smask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + seq * L + s, mask=smask, other=0.0).to(tl.float32)
    dt, slope = _dt_and_slope(x, SOFTPLUS)
    a = tl.exp(dt * A[None, :])
    bu = dt * Bv[:, None] * u
    return kd, A, Dv, seq_offs, u, gy, Bv, Cv, dt, slope, a, bu


@triton.jit
def _to_grid(v, inverse_ptr, k, L, s, smask, LP: tl.constexpr, SUB_D: tl.constexpr):
    """Direction k's (steps, channels) tile in grid order: row q is the step that visits grid row q."""
    inv = tl.load(inverse_ptr + k * L + s, mask=smask, other=0)
    return tl.gather(v, tl.broadcast_to(inv[:, None], (LP, SUB_D)), axis=0)


@triton.jit
def _snake_scan_fwd_kernel(x_ptr, delta_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, paths_ptr, inverse_ptr, y_ptr,
                           L, dim, n_blk,
                           SOFTPLUS: tl.constexpr, SUB_D: tl.constexpr, LP: tl.constexpr, STAGES: tl.constexpr):
    b, j, ch, cmask, s, smask, mask, map_rows = _program(L, dim, n_blk, SUB_D, LP)
    acc = tl.zeros([LP, SUB_D], dtype=tl.float32)
    for k in tl.range(4, num_stages=STAGES):
        _kd, _A, Dv, _so, u, _gy, _B, Cv, _dt, _slope, a, bu = _direction(
            x_ptr, x_ptr, delta_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, paths_ptr, k, b, ch, cmask, s, smask, mask,
            map_rows, L, dim, SOFTPLUS, False)
        _ap, h = tl.associative_scan((a, bu), axis=0, combine_fn=_fwd_combine)
        acc += _to_grid(h * Cv[:, None] + Dv[None, :] * u, inverse_ptr, k, L, s, smask, LP, SUB_D)
    tl.store(y_ptr + (map_rows + s)[:, None] * dim + ch[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _snake_scan_bwd_kernel(x_ptr, delta_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, paths_ptr, inverse_ptr, gy_ptr,
                           gx_ptr, gdelta_ptr, gA_ptr, gD_ptr, gbias_ptr, gB_ptr, gC_ptr,
                           L, dim, n_blk,
                           SOFTPLUS: tl.constexpr, SUB_D: tl.constexpr, LP: tl.constexpr, STAGES: tl.constexpr):
    b, j, ch, cmask, s, smask, mask, map_rows = _program(L, dim, n_blk, SUB_D, LP)
    acc = tl.zeros([LP, SUB_D], dtype=tl.float32)
    zeros = tl.zeros([LP, SUB_D], dtype=tl.float32)
    ones = tl.full([LP, SUB_D], 1.0, tl.float32)
    for k in tl.range(4, num_stages=STAGES):
        kd, A, Dv, seq_offs, u, gy, Bv, Cv, dt, slope, a, bu = _direction(
            x_ptr, gy_ptr, delta_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, paths_ptr, k, b, ch, cmask, s, smask, mask,
            map_rows, L, dim, SOFTPLUS, True)
        _ap, ah_prev, _b = tl.associative_scan((a, zeros, bu), axis=0, combine_fn=_fwd_prev_combine)  # h_{-1} = 0
        h = ah_prev + bu
        _fa, _al, gh = tl.associative_scan((a, ones, Cv[:, None] * gy), axis=0, combine_fn=_rev_combine,
                                           reverse=True)  # nothing flows back from after the last step
        gdelta = gh * (Bv[:, None] * u + A[None, :] * ah_prev) * slope
        gu = gh * dt * Bv[:, None] + gy * Dv[None, :]
        tl.store(gdelta_ptr + seq_offs, gdelta.to(gdelta_ptr.dtype.element_ty), mask=mask)
        acc += _to_grid(gu, inverse_ptr, k, L, s, smask, LP, SUB_D)
        # padded steps and channels have u = gy = 0, hence gh = 0: they add nothing to the sums below
        ra, rd, rb = tl.reduce((gh * dt * ah_prev, gy * u, gdelta), axis=0, combine_fn=_add3)
        sums = b.to(tl.int64) * (4 * dim) + kd
        tl.store(gA_ptr + sums, ra, mask=cmask)
        tl.store(gD_ptr + sums, rd, mask=cmask)
        tl.store(gbias_ptr + sums, rb, mask=cmask)
        part = ((b * n_blk + j) * 4 + k).to(tl.int64) * L + s  # (B, n_blk, 4, L)
        tl.store(gB_ptr + part, tl.sum(gh * dt * u, axis=1), mask=smask)
        tl.store(gC_ptr + part, tl.sum(gy * h, axis=1), mask=smask)
    tl.store(gx_ptr + (map_rows + s)[:, None] * dim + ch[None, :], acc.to(gx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def eligible(length: int, d_state: int = 1, forward: bool = False) -> bool:
    """Whether ss2d_core runs a sequence of ``length`` steps through these kernels (d_state 1, L <= MAX_LENGTH;
    with ``forward``, whether it runs the fused forward: L <= MAX_LENGTH or L <= FWD_MAX_LENGTH)."""
    limit = max(MAX_LENGTH, FWD_MAX_LENGTH) if forward else MAX_LENGTH
    return d_state == 1 and 0 < length <= limit


def launch_config(length: int, backward: bool, sub_d=None, num_warps=None, stages=None) -> tuple[int, int, int]:
    """(channels a program, warps, stages) of the forward or backward kernel for sequences of ``length`` steps:
    what is given, else the table's entry (FWD_LAUNCH / BWD_LAUNCH), else the default."""
    table, default = (BWD_LAUNCH, BWD_DEFAULT) if backward else (FWD_LAUNCH, FWD_DEFAULT)
    d_sub, d_nw, d_st = table.get(int(length), default)
    sub_d, num_warps, stages = int(sub_d or d_sub), int(num_warps or d_nw), int(stages or d_st)
    for name, v in (("sub_d", sub_d), ("num_warps", num_warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"snake scan launch: {name} must be a power of two, got {v}")
    if stages < 1:
        raise ValueError(f"snake scan launch: stages must be >= 1, got {stages}")
    return sub_d, num_warps, stages


def _check(x, delta, B, C, A, D, bias, paths, inverse):
    if x.dim() != 3:
        raise ValueError(f"x must be the channels-last map (B, L, D), got shape {tuple(x.shape)}")
    batch, length, dim = x.shape
    k = K_DIRS
    if delta.shape != (batch, k * dim, length):
        raise ValueError(f"delta must be (B, {k}*D, L) = {(batch, k * dim, length)}, got {tuple(delta.shape)}")
    if B.shape != (batch, k, 1, length) or C.shape != B.shape:
        raise ValueError(f"B, C must be (B, {k}, 1, L) for d_state 1, got {tuple(B.shape)}, {tuple(C.shape)}")
    if A.shape != (k * dim, 1) or D.shape != (k * dim,) or bias.shape != (k * dim,):
        raise ValueError(f"A must be ({k * dim}, 1), D and delta_bias ({k * dim},); got {tuple(A.shape)}, "
                         f"{tuple(D.shape)}, {tuple(bias.shape)}")
    for name, t in (("paths", paths), ("inverse", inverse)):
        if t.shape != (k, length):
            raise ValueError(f"{name} must be ({k}, {length}), got {tuple(t.shape)}")
    for name, t in zip("x delta B C A D bias paths inverse".split(), (x, delta, B, C, A, D, bias, paths, inverse)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return batch, length, dim


def snake_scan_fwd(x, delta, B, C, A, D, bias, paths, inverse, delta_softplus=True, sub_d=None, num_warps=None,
                   stages=None):
    """y (B, L, D) channels-last in x's dtype: sum over the four directions k of the d_state-1 scan of
    u = x[:, paths[k]] with delta (B, 4D, L) (direction-major rows), B, C (B, 4, 1, L), A (4D, 1), D, bias (4D,)
    fp32, put back at the grid positions. All contiguous, one device."""
    batch, length, dim = _check(x, delta, B, C, A, D, bias, paths, inverse)
    sub_d, num_warps, stages = launch_config(length, False, sub_d, num_warps, stages)
    n_blk = triton.cdiv(dim, sub_d)
    y = torch.empty_like(x)
    _snake_scan_fwd_kernel[(batch * n_blk,)](
        x, delta, B, C, A, D, bias, paths, inverse, y, length, dim, n_blk,
        SOFTPLUS=bool(delta_softplus), SUB_D=sub_d, LP=triton.next_power_of_2(length), STAGES=stages,
        num_warps=num_warps)
    return y


def snake_scan_bwd(x, delta, B, C, A, D, bias, paths, inverse, gy, delta_softplus=True, gdelta=None, sub_d=None,
                   num_warps=None, stages=None):
    """The gradients of :func:`snake_scan_fwd` from gy (B, L, D): (gx (B, L, D), gdelta (B, 4D, L), gA (4D, 1),
    gB, gC (B, 4, 1, L), gD, gbias (4D,)), each in its input's dtype. ``gdelta`` may be given, delta itself
    included (a program reads each tile of delta before it writes that tile of gdelta, and no other program's)."""
    batch, length, dim = _check(x, delta, B, C, A, D, bias, paths, inverse)
    if gy.shape != x.shape or not gy.is_contiguous():
        raise ValueError(f"gy must be contiguous {tuple(x.shape)}, got {tuple(gy.shape)}")
    if gdelta is None:
        gdelta = torch.empty_like(delta)
    elif gdelta.shape != delta.shape or gdelta.dtype != delta.dtype or not gdelta.is_contiguous():
        raise ValueError("gdelta must be a contiguous tensor like delta")
    sub_d, num_warps, stages = launch_config(length, True, sub_d, num_warps, stages)
    n_blk = triton.cdiv(dim, sub_d)
    gx = torch.empty_like(x)
    f32 = dict(device=x.device, dtype=torch.float32)
    gA_part = torch.empty(batch, K_DIRS * dim, **f32)
    gD_part = torch.empty(batch, K_DIRS * dim, **f32)
    gbias_part = torch.empty(batch, K_DIRS * dim, **f32)
    gB_part = torch.empty(batch, n_blk, K_DIRS, length, **f32)
    gC_part = torch.empty(batch, n_blk, K_DIRS, length, **f32)
    _snake_scan_bwd_kernel[(batch * n_blk,)](
        x, delta, B, C, A, D, bias, paths, inverse, gy, gx, gdelta, gA_part, gD_part, gbias_part, gB_part, gC_part,
        length, dim, n_blk,
        SOFTPLUS=bool(delta_softplus), SUB_D=sub_d, LP=triton.next_power_of_2(length), STAGES=stages,
        num_warps=num_warps)
    return (gx, gdelta, gA_part.sum(0).unsqueeze(1).to(A.dtype), gB_part.sum(1).unsqueeze(2).to(B.dtype),
            gC_part.sum(1).unsqueeze(2).to(C.dtype), gD_part.sum(0).to(D.dtype), gbias_part.sum(0).to(bias.dtype))
