"""Selective scan for d_state N = 1 in Triton: forward and backward, bandwidth-bound and deterministic.

LaMamba-Diff's SS2D always runs the Mamba recurrence with one state per channel, so the scan of a
(batch, channel) row is a scalar first-order linear recurrence along L:

    x = delta + bias;  dt = softplus(x) (x itself for x > 20, torch's threshold);  a_s = exp(dt_s A)
    h_s = a_s h_{s-1} + dt_s B_s u_s   (h_{-1} = 0);   y_s = C_s h_s + D u_s

Layout (mamba-ssm's convention, see selective_scan.py): u, delta (batch, dim, L); A (dim, 1) fp32;
B, C (batch, G, 1, L), channel c in group c // (dim // G); D, delta_bias (dim,) fp32.

Kernels. A tile is SUB_D channels of one batch row (all in one group, so the B/C rows are loaded once and
broadcast) by CHUNK steps; a program walks L in chunks (one chunk whenever L <= 4096), carrying the state
between chunks, and may own NSUB such blocks of channels one after the other. When L fits one chunk, the loop
over a program's blocks can be software-pipelined (STAGES > 1: Triton fetches the next block's u, delta, dy
with cp.async into shared memory while the current block is scanned), which hides the loads' latency where
the scans' registers leave few warps resident. The scans are ``tl.associative_scan`` in fp32:

* forward: pairs (a, b) with (a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2), so h = cumprod(a) h0 + scan(b).
  It writes y (u's dtype) and, per row, the state entering each chunk (batch, dim, n_chunks) fp32:
  4 bytes per row and chunk, so the backward recomputes h rather than reading a stored h (a stored fp32
  h would add 4 bytes per element written and 4 read, +80% over the 10 bytes/element of the bf16
  backward's u, delta, gy reads and gu, gdelta writes).
* backward, per chunk from the last: recompute h from the chunk's entry state, then the reverse scan
  gh_s = C_s gy_s + a_{s+1} gh_{s+1}. The a_{s+1} is one step ahead of the element, and a register
  tile cannot be shifted, so the reverse scan runs over triples describing a segment [s..t]:
  (a_s, prod_{r=s+1..t} a_r, sum_{k=s..t} prod_{r=s+1..k} a_r c_k) with c = C gy; element s is
  (a_s, 1, c_s). Composition (lo = [s..m], hi = [m+1..t]): (fa_lo, al_lo fa_hi al_hi,
  be_lo + al_lo fa_hi be_hi). Then gh_s = be_s + al_s P, with P = a gh at the first step of the next
  chunk (0 after the last). No division, no shifted reload.
  The recomputation of h also scans triples, (prod a, a_t h_{t-1}, b_t) per segment, so that a_s h_{s-1}
  comes out directly: mamba-ssm's kernel takes it as h_s - dt_s B_s u_s, which cancels catastrophically
  when a_s is small (large dt |A|) and spoils gA and gdelta there. Then
      gu = gh dt B + gy D;   gdt = gh (B u + A a h_{s-1});   gdelta = gdt sigmoid(x) (1 for x > 20)
      gA = sum gh dt a h_{s-1};  gD = sum gy u;  gbias = sum gdelta;  gB = sum_group gh dt u;  gC = sum_group gy h
  The sums are written per program to fp32 buffers (per (batch, row) for gA/gD/gbias, per
  (batch, channel block, step) for gB/gC) and reduced afterwards by one more kernel, in a fixed order: no
  atomics, deterministic.
  When L fits one chunk a program covers NSUB sub-blocks of SUB_D channels (16 channels by default),
  summing gB/gC in registers, so the partial buffers cost 8 bytes per step per 16 channels (+5% over the
  bf16 backward's 10 bytes per element).

Exposed as the custom ops ``lamamba::scan1_fwd`` / ``lamamba::scan1_bwd`` (fake kernels + autograd), so
torch.compile traces through without a graph break, and as ``selective_scan_triton``.

Importing this module imports triton: selective_scan.py imports it guarded. Under TRITON_INTERPRET=1
(set before this module is imported) the kernels run on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_CHUNK = 4096  # longest L scanned as one tile; longer sequences are chunked with a carried state
# Measured launch configurations by tile length (CHUNK, the sequence length when L fits one tile), each key
# optional: "sub_d" (rows a tile), "nsub" (forward: sub-blocks a program) or "dblk" (backward: channels a program),
# "num_warps", "stages" (software-pipeline depth of the loop over a program's sub-blocks, 1 = none). What a length
# does not list comes from the formulas of _fwd_config / _bwd_config. Set from a sweep on one H200 (2026-12-07, bf16,
# LaMamba-XL's shapes; docs/performance.md): the backward's loop pipelined three deep over 32 channels a program
# (128 at 64 steps) took 1.19 ms against 1.62 at 64 x 2560 x 1024, 0.52 against 0.61 at 64 x 5120 x 256 and 0.28
# against 0.32 at 64 x 10240 x 64; the forward gained 1-4% from four sub-blocks a program.
FWD_LAUNCH: dict[int, dict[str, int]] = {
    64: dict(sub_d=32, nsub=4, num_warps=4, stages=1),
    256: dict(sub_d=8, nsub=4, num_warps=4, stages=1),
    1024: dict(sub_d=2, nsub=4, num_warps=4, stages=2),
}
BWD_LAUNCH: dict[int, dict[str, int]] = {
    64: dict(sub_d=8, dblk=128, num_warps=1, stages=3),
    256: dict(sub_d=1, dblk=32, num_warps=1, stages=3),
    1024: dict(sub_d=1, dblk=32, num_warps=4, stages=3),
}
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _fwd_combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _fwd_prev_combine(p1, q1, b1, p2, q2, b2):
    # segment [s..t] as (prod a, a_t h_{t-1} given h_{s-1} = 0, b_t): a_t h_{t-1} = p h_{s-1} + q, h_t = that + b_t
    return p1 * p2, p2 * (q1 + b1) + q2, b2


@triton.jit
def _rev_combine(fa_hi, al_hi, be_hi, fa_lo, al_lo, be_lo):
    # reverse=True scans the flipped sequence: the carry (first operand) is the later segment [m+1..t],
    # the second operand the earlier one [s..m].
    t = al_lo * fa_hi
    return fa_lo, t * al_hi, be_lo + t * be_hi


@triton.jit
def _add3(a1, b1, c1, a2, b2, c2):
    return a1 + a2, b1 + b2, c1 + c2


@triton.jit
def _dt_and_slope(x, SOFTPLUS: tl.constexpr):
    """dt = softplus(x) with torch's threshold 20, and d dt / dx."""
    if SOFTPLUS:
        z = tl.exp(tl.minimum(x, 20.0))
        w = 1.0 + z
        # log1p(z) = log(w) + log(1 + (z - (w - 1)) / w); the correction matters only for w < 2, where
        # z - (w - 1) is exact and dividing it by w changes it by less than its own rounding.
        lp = tl.log(w) + tl.where(w < 2.0, z - (w - 1.0), 0.0)
        dt = tl.where(x > 20.0, x, lp)
        slope = tl.where(x > 20.0, 1.0, z / w)
    else:
        dt = x
        slope = tl.full(x.shape, 1.0, tl.float32)
    return dt, slope


@triton.jit
def _fwd_tile(u_ptr, delta_ptr, B_ptr, C_ptr, y_ptr, state_ptr, row_id, drow, rows, dim, L, bc_off, c, cols, A, Dv,
              bias, h0, SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, NCHUNK: tl.constexpr):
    """One (SUB_D rows, CHUNK steps) tile of the forward, entered with state h0: stores y and h0, returns the state
    leaving the tile. ``drow``: where each row of delta starts, in elements."""
    l = c * CHUNK + cols
    lmask = l < L
    mask = (rows[:, None] < dim) & lmask[None, :]
    offs = (row_id * L)[:, None] + l[None, :]
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(delta_ptr + drow[:, None] + l[None, :], mask=mask, other=0.0).to(tl.float32) + bias[:, None]
    Bv = tl.load(B_ptr + bc_off + l, mask=lmask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + bc_off + l, mask=lmask, other=0.0).to(tl.float32)
    dt, _slope = _dt_and_slope(x, SOFTPLUS)
    a = tl.exp(dt * A[:, None])
    bu = dt * Bv[None, :] * u
    ap, hs = tl.associative_scan((a, bu), axis=1, combine_fn=_fwd_combine)
    h = ap * h0[:, None] + hs
    y = h * Cv[None, :] + Dv[:, None] * u
    tl.store(state_ptr + row_id * NCHUNK + c, h0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    # the state leaving a full chunk (only chunks before the last, which are full, carry on)
    return tl.sum(tl.where(cols[None, :] == CHUNK - 1, h, 0.0), axis=1)


@triton.jit
def _scan1_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, state_ptr,
                      dim, L, rep, n_groups, d_sb, d_sc,
                      SOFTPLUS: tl.constexpr, SUB_D: tl.constexpr, NSUB: tl.constexpr, CHUNK: tl.constexpr,
                      NCHUNK: tl.constexpr, STAGES: tl.constexpr):
    # A program owns NSUB blocks of SUB_D rows, one after the other; when L fits one chunk the loop over them is
    # software-pipelined (STAGES > 1: the next block's tiles are fetched while this one is scanned). Element
    # (b, row, l) of delta is at b * d_sb + row * d_sc + l (u and y: contiguous).
    DBLK: tl.constexpr = SUB_D * NSUB
    pid = tl.program_id(0)
    n_blk = dim // DBLK
    b = pid // n_blk
    j = pid % n_blk
    g = (j * DBLK) // rep
    cols = tl.arange(0, CHUNK)
    bc_off = (b * n_groups + g).to(tl.int64) * L
    for sub in tl.range(NSUB, num_stages=STAGES):
        rows = j * DBLK + sub * SUB_D + tl.arange(0, SUB_D)
        row_id = (b * dim + rows).to(tl.int64)
        drow = b.to(tl.int64) * d_sb + rows.to(tl.int64) * d_sc
        A = tl.load(A_ptr + rows)
        Dv = tl.load(D_ptr + rows)
        bias = tl.load(bias_ptr + rows)
        h0 = tl.zeros([SUB_D], dtype=tl.float32)
        if NCHUNK == 1:
            _fwd_tile(u_ptr, delta_ptr, B_ptr, C_ptr, y_ptr, state_ptr, row_id, drow, rows, dim, L, bc_off, 0, cols,
                      A, Dv, bias, h0, SOFTPLUS, CHUNK, NCHUNK)
        else:
            for c in range(NCHUNK):
                h0 = _fwd_tile(u_ptr, delta_ptr, B_ptr, C_ptr, y_ptr, state_ptr, row_id, drow, rows, dim, L, bc_off,
                               c, cols, A, Dv, bias, h0, SOFTPLUS, CHUNK, NCHUNK)


@triton.jit
def _bwd_tile(u_ptr, delta_ptr, gy_ptr, gu_ptr, gdelta_ptr, B_ptr, C_ptr, state_ptr, row_id, drow, rows, dim, L,
              bc_off, c, cols, A, Dv, bias, p_next, SOFTPLUS: tl.constexpr, SUB_D: tl.constexpr, CHUNK: tl.constexpr,
              NCHUNK: tl.constexpr):
    """One (SUB_D rows, CHUNK steps) tile of the backward, given P = a gh at the first step of the next chunk:
    stores gu and gdelta, returns (P for the chunk before, the tile's per-row sums for gA, gD, gbias, its per-step
    sums over rows for gB, gC). ``drow``: where each row of delta (and gdelta) starts, in elements."""
    l = c * CHUNK + cols
    lmask = l < L
    mask = (rows[:, None] < dim) & lmask[None, :]
    offs = (row_id * L)[:, None] + l[None, :]
    doffs = drow[:, None] + l[None, :]
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(delta_ptr + doffs, mask=mask, other=0.0).to(tl.float32) + bias[:, None]
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + bc_off + l, mask=lmask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + bc_off + l, mask=lmask, other=0.0).to(tl.float32)
    h0 = tl.load(state_ptr + row_id * NCHUNK + c)
    dt, slope = _dt_and_slope(x, SOFTPLUS)
    a = tl.exp(dt * A[:, None])
    bu = dt * Bv[None, :] * u
    zeros = tl.zeros([SUB_D, CHUNK], dtype=tl.float32)
    ap, q, _b = tl.associative_scan((a, zeros, bu), axis=1, combine_fn=_fwd_prev_combine)
    ah_prev = ap * h0[:, None] + q  # a_s h_{s-1}, without the cancellation of h_s - dt_s B_s u_s
    h = ah_prev + bu
    cg = Cv[None, :] * gy
    ones = tl.full([SUB_D, CHUNK], 1.0, tl.float32)
    _fa, al, be = tl.associative_scan((a, ones, cg), axis=1, combine_fn=_rev_combine, reverse=True)
    gh = be + al * p_next[:, None]
    p_prev = tl.sum(tl.where(cols[None, :] == 0, a * gh, 0.0), axis=1)
    gdt = gh * (Bv[None, :] * u + A[:, None] * ah_prev)
    gdelta = gdt * slope
    gu = gh * dt * Bv[None, :] + gy * Dv[:, None]
    tl.store(gu_ptr + offs, gu.to(gu_ptr.dtype.element_ty), mask=mask)
    tl.store(gdelta_ptr + doffs, gdelta.to(gdelta_ptr.dtype.element_ty), mask=mask)
    # masked steps have u = gy = 0, hence gh = 0: they add nothing to the sums below
    ra, rd, rb = tl.reduce((gh * dt * ah_prev, gy * u, gdelta), axis=1, combine_fn=_add3)
    return p_prev, ra, rd, rb, tl.sum(gh * dt * u, axis=0), tl.sum(gy * h, axis=0)


@triton.jit
def _scan1_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, gy_ptr, state_ptr,
                      gu_ptr, gdelta_ptr, gA_ptr, gD_ptr, gbias_ptr, gB_ptr, gC_ptr,
                      dim, L, rep, n_groups, d_sb, d_sc,
                      SOFTPLUS: tl.constexpr, SUB_D: tl.constexpr, NSUB: tl.constexpr,
                      CHUNK: tl.constexpr, NCHUNK: tl.constexpr, STAGES: tl.constexpr):
    # delta and gdelta share one layout, element (b, row, l) at b * d_sb + row * d_sc + l (u, gy, gu: contiguous).
    # NSUB > 1 only when NCHUNK == 1 (the launcher checks): the gB/gC partials of a program then live in
    # registers across its sub-blocks, and the loop over them is software-pipelined (STAGES > 1: the next
    # sub-block's tiles are fetched while this one is scanned); with several chunks each chunk's partial row is
    # stored directly.
    DBLK: tl.constexpr = SUB_D * NSUB
    pid = tl.program_id(0)
    n_blk = dim // DBLK
    b = pid // n_blk
    j = pid % n_blk
    g = (j * DBLK) // rep
    cols = tl.arange(0, CHUNK)
    bc_off = (b * n_groups + g).to(tl.int64) * L
    part_off = (b * n_blk + j).to(tl.int64) * L
    accB = tl.zeros([CHUNK], dtype=tl.float32)
    accC = tl.zeros([CHUNK], dtype=tl.float32)
    for sub in tl.range(NSUB, num_stages=STAGES):
        rows = j * DBLK + sub * SUB_D + tl.arange(0, SUB_D)
        row_id = (b * dim + rows).to(tl.int64)
        drow = b.to(tl.int64) * d_sb + rows.to(tl.int64) * d_sc
        A = tl.load(A_ptr + rows)
        Dv = tl.load(D_ptr + rows)
        bias = tl.load(bias_ptr + rows)
        p_next = tl.zeros([SUB_D], dtype=tl.float32)  # a gh at the first step of the following chunk
        if NCHUNK == 1:
            _p, sum_a, sum_d, sum_bias, part_b, part_c = _bwd_tile(
                u_ptr, delta_ptr, gy_ptr, gu_ptr, gdelta_ptr, B_ptr, C_ptr, state_ptr, row_id, drow, rows, dim, L,
                bc_off, 0, cols, A, Dv, bias, p_next, SOFTPLUS, SUB_D, CHUNK, NCHUNK)
            accB += part_b
            accC += part_c
        else:
            sum_a = tl.zeros([SUB_D], dtype=tl.float32)
            sum_d = tl.zeros([SUB_D], dtype=tl.float32)
            sum_bias = tl.zeros([SUB_D], dtype=tl.float32)
            for ci in range(NCHUNK):
                c = NCHUNK - 1 - ci
                p_next, ra, rd, rb, part_b, part_c = _bwd_tile(
                    u_ptr, delta_ptr, gy_ptr, gu_ptr, gdelta_ptr, B_ptr, C_ptr, state_ptr, row_id, drow, rows, dim, L,
                    bc_off, c, cols, A, Dv, bias, p_next, SOFTPLUS, SUB_D, CHUNK, NCHUNK)
                sum_a += ra
                sum_d += rd
                sum_bias += rb
                l = c * CHUNK + cols
                tl.store(gB_ptr + part_off + l, part_b, mask=l < L)
                tl.store(gC_ptr + part_off + l, part_c, mask=l < L)
        tl.store(gA_ptr + row_id, sum_a)
        tl.store(gD_ptr + row_id, sum_d)
        tl.store(gbias_ptr + row_id, sum_bias)
    if NCHUNK == 1:
        lmask1 = cols < L
        tl.store(gB_ptr + part_off + cols, accB, mask=lmask1)
        tl.store(gC_ptr + part_off + cols, accC, mask=lmask1)


@triton.jit
def _bwd_sums_kernel(rows_ptr, steps_ptr, gA_ptr, gD_ptr, gbias_ptr, gB_ptr, gC_ptr, batch, dim, L, per_group,
                     n_row_progs, rows_plane, steps_plane, BLK_B: tl.constexpr, BLK_D: tl.constexpr,
                     BLK_G: tl.constexpr, BLK_L: tl.constexpr):
    """The backward's partial sums reduced in one launch. Programs below n_row_progs: BLK_D rows of the
    (3, batch, dim) per-row partials (gA, gD, gbias; rows_plane = batch * dim apart) summed over the batch, fp32.
    The others: BLK_L steps of one (batch row, group) of the (2, batch, n_blk, L) per-block partials (gB, gC;
    steps_plane apart) summed over the group's per_group blocks and stored in gB's (gC's) dtype. Each sum runs
    in a fixed order: deterministic."""
    pid = tl.program_id(0)
    if pid < n_row_progs:
        cols = pid * BLK_D + tl.arange(0, BLK_D)
        cmask = cols < dim
        acc_a = tl.zeros([BLK_D], dtype=tl.float32)
        acc_d = tl.zeros([BLK_D], dtype=tl.float32)
        acc_b = tl.zeros([BLK_D], dtype=tl.float32)
        for b0 in range(0, batch, BLK_B):
            bs = b0 + tl.arange(0, BLK_B)
            m = (bs[:, None] < batch) & cmask[None, :]
            offs = bs.to(tl.int64)[:, None] * dim + cols[None, :]
            acc_a += tl.sum(tl.load(rows_ptr + offs, mask=m, other=0.0), axis=0)
            acc_d += tl.sum(tl.load(rows_ptr + rows_plane + offs, mask=m, other=0.0), axis=0)
            acc_b += tl.sum(tl.load(rows_ptr + 2 * rows_plane + offs, mask=m, other=0.0), axis=0)
        tl.store(gA_ptr + cols, acc_a, mask=cmask)
        tl.store(gD_ptr + cols, acc_d, mask=cmask)
        tl.store(gbias_ptr + cols, acc_b, mask=cmask)
    else:
        q = pid - n_row_progs
        n_lblk = tl.cdiv(L, BLK_L)
        bg = q // n_lblk  # batch row * n_groups + group: its blocks start at bg * per_group
        steps = (q % n_lblk) * BLK_L + tl.arange(0, BLK_L)
        lmask = steps < L
        # (names apart from the other branch's: Triton types a name once across both branches of an if)
        sum_gb = tl.zeros([BLK_L], dtype=tl.float32)
        sum_gc = tl.zeros([BLK_L], dtype=tl.float32)
        for i0 in range(0, per_group, BLK_G):
            blks = i0 + tl.arange(0, BLK_G)
            bmask = (blks[:, None] < per_group) & lmask[None, :]
            boffs = (bg.to(tl.int64) * per_group + blks)[:, None] * L + steps[None, :]
            sum_gb += tl.sum(tl.load(steps_ptr + boffs, mask=bmask, other=0.0), axis=0)
            sum_gc += tl.sum(tl.load(steps_ptr + steps_plane + boffs, mask=bmask, other=0.0), axis=0)
        out = bg.to(tl.int64) * L + steps
        tl.store(gB_ptr + out, sum_gb.to(gB_ptr.dtype.element_ty), mask=lmask)
        tl.store(gC_ptr + out, sum_gc.to(gC_ptr.dtype.element_ty), mask=lmask)


# ----------------------------------------------------------------------------- launch configuration


def default_chunk(length: int) -> int:
    """Steps per tile: the next power of two of L up to MAX_CHUNK (then L is chunked)."""
    return min(triton.next_power_of_2(max(int(length), 1)), MAX_CHUNK)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n (>= 1)."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _fwd_config(rep: int, chunk: int, n_chunks: int, sub_d=None, nsub=None, num_warps=None, stages=None):
    # Measured on an H200 (`lamamba bench kernels --sweep`, lamamba_dist/bench/kernels.py): ~2048-element tiles at
    # 16 elements a thread, at most 4 warps (L 4096: 4 warps 0.51 ms, 8 warps 0.54, 16 warps 0.57).
    t = FWD_LAUNCH.get(chunk, {})
    sub_d = sub_d or _pow2_divisor(rep, t.get("sub_d", max(1, 2048 // chunk)))
    if rep % sub_d:
        raise ValueError(f"sub_d={sub_d} must divide the group size {rep}")
    if nsub is None:  # the default, reduced to what keeps a program's sub-blocks in one group
        nsub = _pow2_divisor(rep // sub_d, t.get("nsub", 1))
    if rep % (sub_d * nsub):
        raise ValueError(f"sub_d*nsub={sub_d * nsub} must divide the group size {rep}")
    num_warps = num_warps or t.get("num_warps") or min(max(sub_d * chunk // 512, 1), 4)
    return sub_d, nsub, num_warps, _stages(stages or t.get("stages", 1), nsub, n_chunks)


def _stages(stages: int, nsub: int, n_chunks: int) -> int:
    """Pipeline depth of the loop over a program's sub-blocks: 1 (none) where there is nothing to overlap (one
    sub-block) or where each sub-block is itself a loop over chunks."""
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    return 1 if nsub == 1 or n_chunks > 1 else stages


def _bwd_config(rep: int, chunk: int, n_chunks: int, sub_d=None, nsub=None, num_warps=None, stages=None):
    # Measured on an H200: one row per tile (>= 256 steps), 8 elements a thread, 16 channels a program
    # (L 256: 1 warp; L 1024: 4 warps; L 4096: 16 warps, 1.85 ms vs 2.15 with 8) beat the alternatives. For the
    # shortest sequences (L <= 64) on one H100: 8 rows a tile and 64 channels a program, one warp (0.33 ms against
    # 0.37 with 4 rows and 16 channels, at 64 x 10240 x 64; `lamamba bench kernels --sweep`).
    short = chunk <= 64
    t = BWD_LAUNCH.get(chunk, {})
    sub_d = sub_d or _pow2_divisor(rep, t.get("sub_d", max(1, (512 if short else 256) // chunk)))
    if rep % sub_d:
        raise ValueError(f"sub_d={sub_d} must divide the group size {rep}")
    if nsub is None:
        dblk = t.get("dblk", 64 if short else 16)
        nsub = 1 if n_chunks > 1 else _pow2_divisor(rep // sub_d, max(1, dblk // sub_d))
    if n_chunks > 1 and nsub != 1:
        raise ValueError("several sub-blocks per program need L to fit one chunk")
    if rep % (sub_d * nsub):
        raise ValueError(f"sub_d*nsub={sub_d * nsub} must divide the group size {rep}")
    num_warps = num_warps or t.get("num_warps") or min(max(sub_d * chunk // (512 if short else 256), 1), 16)
    return sub_d, nsub, num_warps, _stages(stages or t.get("stages", 1), nsub, n_chunks)


def _check(u, delta, A, B, C, D, bias):
    batch, dim, length = u.shape
    if A.shape != (dim, 1):
        raise ValueError(f"the triton scan is for d_state 1: A must be ({dim}, 1), got {tuple(A.shape)}")
    groups = B.shape[1]
    if B.shape != (batch, groups, 1, length) or C.shape != B.shape or dim % groups:
        raise ValueError(f"B, C must be (batch, G, 1, L) with G dividing dim; got {tuple(B.shape)}, {tuple(C.shape)}")
    if delta.shape != u.shape or D.shape != (dim,) or bias.shape != (dim,):
        raise ValueError("delta must match u; D and delta_bias must be (dim,)")
    if not _rows_apart(delta):
        raise ValueError(f"delta must have unit stride along L and rows that do not overlap, got strides "
                         f"{delta.stride()} for shape {tuple(delta.shape)}")
    return batch, dim, length, groups


def _rows_apart(t) -> bool:
    """Whether the (batch, dim, L) tensor t has unit stride along L and its batch x dim rows of L elements lie
    apart in memory (any order of the two row axes)."""
    if t.shape[2] > 1 and t.stride(2) != 1:
        return False
    (n_in, s_in), (n_out, s_out) = sorted(((t.shape[0], t.stride(0)), (t.shape[1], t.stride(1))),
                                          key=lambda ns: (ns[0] > 1, ns[1]))
    if n_in == 1:
        return n_out == 1 or s_out >= t.shape[2]
    return s_in >= t.shape[2] and (n_out == 1 or s_out >= s_in * n_in)


def _out_buffer(out, like, name, strided=False):
    """``out`` checked to take the place of a fresh tensor like ``like`` (or a fresh one when None): contiguous, or
    with ``strided`` in ``like``'s layout."""
    if out is None:
        return torch.empty_like(like) if strided else torch.empty_like(like, memory_format=torch.contiguous_format)
    layout_ok = out.stride() == like.stride() if strided else out.is_contiguous()
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device or not layout_ok:
        want = f"strides {like.stride()}" if strided else "contiguous"
        raise ValueError(f"{name} must be {like.dtype} {tuple(like.shape)} on {like.device} ({want}), got "
                         f"{out.dtype} {tuple(out.shape)} with strides {out.stride()}")
    return out


def scan1_fwd_launch(u, delta, A, B, C, D, bias, delta_softplus=True, chunk=None, sub_d=None, num_warps=None,
                     y=None, nsub=None, stages=None):
    """Runs the forward kernel: (y in u's dtype, entry state of every chunk (batch, dim, n_chunks) fp32).
    All tensors contiguous, on one device, but delta, which may be any layout with unit stride along L whose rows
    do not overlap (as in scan1_bwd_launch); A/D/bias fp32. ``y`` may be given, u itself included: a program
    loads each tile of u before it stores that tile of y, and no program reads another's rows."""
    batch, dim, length, groups = _check(u, delta, A, B, C, D, bias)
    chunk = chunk or default_chunk(length)
    n_chunks = triton.cdiv(length, chunk)
    rep = dim // groups
    sub_d, nsub, num_warps, stages = _fwd_config(rep, chunk, n_chunks, sub_d, nsub, num_warps, stages)
    y = _out_buffer(y, u, "y")
    states = torch.empty(batch, dim, n_chunks, device=u.device, dtype=torch.float32)
    grid = (batch * (dim // (sub_d * nsub)),)
    _scan1_fwd_kernel[grid](u, delta, A, B, C, D, bias, y, states, dim, length, rep, groups, delta.stride(0),
                            delta.stride(1), SOFTPLUS=bool(delta_softplus), SUB_D=sub_d, NSUB=nsub, CHUNK=chunk,
                            NCHUNK=n_chunks, STAGES=stages, num_warps=num_warps)
    return y, states


def scan1_bwd_launch(u, delta, A, B, C, D, bias, gy, states, delta_softplus=True, chunk=None,
                     sub_d=None, nsub=None, num_warps=None, gu=None, gdelta=None, stages=None):
    """Runs the backward kernel and the deterministic reduction of its partial sums: the 7 input grads, each in
    its input's dtype. ``gu`` and ``gdelta`` may be given, gy and delta themselves included (a program loads each
    tile of u, delta and gy before it stores that tile of gu and gdelta, and reads no other program's rows): a
    caller that needs neither gy nor delta afterwards then allocates no new (batch, dim, L) tensor.

    u and gy are contiguous; delta may instead be any layout with unit stride along L whose rows do not overlap
    (a (dim, batch, L) buffer seen as (batch, dim, L), say), and gdelta then has delta's strides: the caller
    can take the weight gradient of a per-channel projection of the deltas as one GEMM over batch and steps."""
    batch, dim, length, groups = _check(u, delta, A, B, C, D, bias)
    chunk = chunk or default_chunk(length)
    n_chunks = triton.cdiv(length, chunk)
    if states.shape != (batch, dim, n_chunks):
        raise ValueError(f"states {tuple(states.shape)} do not match chunk={chunk}")
    rep = dim // groups
    sub_d, nsub, num_warps, stages = _bwd_config(rep, chunk, n_chunks, sub_d, nsub, num_warps, stages)
    n_blk = dim // (sub_d * nsub)
    gu = _out_buffer(gu, u, "gu")
    gdelta = _out_buffer(gdelta, delta, "gdelta", strided=True)
    f32 = dict(device=u.device, dtype=torch.float32)
    rows_part = torch.empty(3, batch, dim, **f32)  # gA, gD, gbias per (batch, row)
    steps_part = torch.empty(2, batch, n_blk, length, **f32)  # gB, gC per (batch, channel block, step)
    _scan1_bwd_kernel[(batch * n_blk,)](
        u, delta, A, B, C, D, bias, gy, states, gu, gdelta, rows_part[0], rows_part[1], rows_part[2], steps_part[0],
        steps_part[1], dim, length, rep, groups, delta.stride(0), delta.stride(1),
        SOFTPLUS=bool(delta_softplus), SUB_D=sub_d, NSUB=nsub, CHUNK=chunk, NCHUNK=n_chunks, STAGES=stages,
        num_warps=num_warps)
    return (gu, gdelta, *_reduce_partials(rows_part, steps_part, groups, A, B, C, D, bias))


def sums_blocks(per_group: int, length: int) -> tuple[int, int]:
    """(BLK_G, BLK_L) of _bwd_sums_kernel's gB/gC programs: up to 32 channel blocks by up to 4096 // BLK_G steps."""
    blk_g = min(triton.next_power_of_2(per_group), 32)
    return blk_g, min(triton.next_power_of_2(length), max(4096 // blk_g, 16))


def _reduce_partials(rows_part, steps_part, groups, A, B, C, D, bias):
    """(gA, gB, gC, gD, gbias) from the backward kernel's partial sums, in one launch (_bwd_sums_kernel) where
    torch would take five reductions and two casts: on LaMamba-XL's 22 SS2D blocks that is 132 short kernels a
    step fewer."""
    _, batch, dim = rows_part.shape
    n_blk, length = steps_part.shape[2], steps_part.shape[3]
    per_group = n_blk // groups
    f32 = dict(device=rows_part.device, dtype=torch.float32)
    gA, gD, gbias = torch.empty(dim, 1, **f32), torch.empty(dim, **f32), torch.empty(dim, **f32)
    gB = torch.empty(batch, groups, 1, length, device=B.device, dtype=B.dtype)
    gC = torch.empty(batch, groups, 1, length, device=C.device, dtype=C.dtype)
    blk_d, (blk_g, blk_l) = 128, sums_blocks(per_group, length)
    n_row_progs = triton.cdiv(dim, blk_d)
    grid = (n_row_progs + batch * groups * triton.cdiv(length, blk_l),)
    _bwd_sums_kernel[grid](rows_part, steps_part, gA, gD, gbias, gB, gC, batch, dim, length, per_group, n_row_progs,
                           batch * dim, batch * n_blk * length, BLK_B=32, BLK_D=blk_d, BLK_G=blk_g, BLK_L=blk_l,
                           num_warps=4)
    return gA.to(A.dtype), gB, gC, gD.to(D.dtype), gbias.to(bias.dtype)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("lamamba::scan1_fwd", mutates_args=())
def _scan1_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool,
               chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return scan1_fwd_launch(u, delta, A, B, C, D, delta_bias, delta_softplus, chunk)


@_scan1_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus, chunk):
    batch, dim, length = u.shape
    return torch.empty_like(u), u.new_empty(batch, dim, (length + chunk - 1) // chunk, dtype=torch.float32)


@torch.library.custom_op("lamamba::scan1_bwd", mutates_args=())
def _scan1_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: torch.Tensor, delta_bias: torch.Tensor, dout: torch.Tensor, states: torch.Tensor,
               delta_softplus: bool, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor, torch.Tensor]:
    return scan1_bwd_launch(u, delta, A, B, C, D, delta_bias, dout.contiguous(), states, delta_softplus, chunk)


@_scan1_bwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, dout, states, delta_softplus, chunk):
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), torch.empty_like(D), torch.empty_like(delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus, chunk = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])
    ctx.delta_softplus = delta_softplus
    ctx.chunk = chunk


def _backward(ctx, dout, dstates):
    u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
    grads = _scan1_bwd(u, delta, A, B, C, D, delta_bias, dout, states, ctx.delta_softplus, ctx.chunk)
    return (*grads, None, None)


_scan1_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_triton(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus: bool = True, chunk=None):
    """The N = 1 selective scan through the Triton kernels (custom op with autograd).

    u, delta: (batch, dim, L) fp32 or bf16 (any float dtype; the output has u's dtype); A: (dim, 1);
    B, C: (batch, G, 1, L); D, delta_bias: (dim,) (None = zeros). A, D, delta_bias are used in fp32;
    grads come back in each input's dtype. ``chunk`` (a power of two) overrides the tile length along L.
    """
    dim = u.shape[1]
    if D is None:
        D = u.new_zeros(dim, dtype=torch.float32)
    if delta_bias is None:
        delta_bias = u.new_zeros(dim, dtype=torch.float32)
    chunk = int(chunk or default_chunk(u.shape[2]))
    if chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    out, _ = _scan1_fwd(u.contiguous(), delta.contiguous(), A.float().contiguous(), B.contiguous(), C.contiguous(),
                        D.float().contiguous(), delta_bias.float().contiguous(), bool(delta_softplus), chunk)
    return out
