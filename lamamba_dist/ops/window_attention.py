"""Swin-style (shifted) window multi-head attention pieces (docs/model.md §5).

Window geometry (partition / reverse, relative-position index, shift mask) is built once per
(resolution, window, shift, device) and cached. ``window_attention_core`` is the single dispatch point
for the attention maths on windows:

    backend "sdpa"       torch.nn.functional.scaled_dot_product_attention (flash / cuDNN / efficient
                         kernels on GPU, the math kernel on CPU)
    backend "flash"      flash-attn, when installed (additive bias unsupported by it, so only used when
                         the caller passes no bias; otherwise falls back to SDPA)
    backend "reference"  explicit softmax(q k^T * scale + bias) v
    backend "triton"     window_attention_triton.py: one Triton program per (window, head), reading q, k and v from
                         the qkv projection's output and the bias per window position, its gradient summed
                         over the batch in the kernel (CUDA, or CPU under TRITON_INTERPRET=1); opt-in until a
                         whole training step on the GPU says so (docs/performance.md)
    backend "auto"       LAMAMBA_ATTN_BACKEND when set (read at import), else sdpa; on CUDA a head_dim
                         that is not a multiple of 8 (LaMamba-XL's stage 0 has 20) is zero-padded to the
                         next multiple of 8 first, since CUDA's fused kernels refuse it and SDPA would
                         fall back to its slow math kernel. Zero columns in q and k add nothing to q.k,
                         zero columns in v give zero outputs that are sliced off, and the scale stays
                         head_dim^-0.5: the result is the same function.

``window_attention`` is the entry from the qkv projection's output (B * nW, N, 3C) to the output projection's
input (B * nW, N, C): the "triton" kernels take it as it is, the others split it into q, k and v for
``window_attention_core``. Given a token order, it works on the map's tokens instead, (B, L, 3C) to (B, L, C),
which the "triton" kernels read through the order: the window partition (and the shift) then costs no gather.

``window_token_order`` folds the cyclic shift and the window partition into one permutation of the tokens,
so that (shift + partition) and (reverse + unshift) are one gather each (``permute_tokens``), with a
gather along the inverse permutation as the backward (no scatter).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from einops import rearrange

from lamamba_dist.ops.optional_kernels import triton_module

SHIFT_MASK_VALUE = -100.0  # the official value (not -inf)


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, w*w, C); windows batch-major, then window-row, window-col; tokens row-major."""
    return rearrange(x, "b (nh a) (nw c) ch -> (b nh nw) (a c) ch", a=w, c=w)


def window_reverse(windows: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    """(B * nW, w*w, C) -> (B, H, W, C)."""
    return rearrange(windows, "(b nh nw) (a c) ch -> b (nh a) (nw c) ch", nh=h // w, nw=wd // w, a=w, c=w)


_INDEX: dict = {}


def relative_position_index(w: int, device="cpu") -> torch.Tensor:
    """(w², w²) int64: idx = (ra - rb + w - 1) * (2w - 1) + (ca - cb + w - 1); cached per (w, device)."""
    key = (w, str(device))
    hit = _INDEX.get(key)
    if hit is None:
        hit = _relative_position_index_cpu(w).to(device)
        _INDEX[key] = hit
    return hit


@functools.lru_cache(maxsize=None)
def _relative_position_index_cpu(w: int) -> torch.Tensor:
    ar = torch.arange(w, device="cpu")
    coords = torch.stack(torch.meshgrid(ar, ar, indexing="ij")).flatten(1)  # (2, w²)
    rel = coords[:, :, None] - coords[:, None, :] + (w - 1)  # (2, w², w²)
    return rel[0] * (2 * w - 1) + rel[1]


def relative_offset_onehot(w: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """(w, w, 2w - 1): E[a, b, d] = 1 where a - b + w - 1 == d, else 0 (one axis of the relative-position index)."""
    ar = torch.arange(w, device=device)
    offset = ar[:, None] - ar[None, :] + (w - 1)  # (w, w)
    return (offset[..., None] == torch.arange(2 * w - 1, device=device)).to(dtype)


def relative_position_bias(table: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Swin's relative-position bias (h, w², w²) from its table ((2w-1)², h), as ``table[relative_position_index(w)]``
    permuted to heads first, but computed as two contractions with the one-hot offsets ``onehot``
    (relative_offset_onehot(w)): bias[h, (ra, ca), (rb, cb)] = sum_ij E[ra, rb, i] E[ca, cb, j] table[(i, j), h].

    The forward is the same gather, exactly (each output sums one table entry and zeros), in the table's dtype:
    products and sums, which autocast leaves alone (no bf16 rounding before the caller adds the shift mask),
    and which run on any device, meta included. The backward is the same two contractions transposed: fused
    elementwise work, deterministic, instead of the indexing's backward (a sort-based index_put accumulate on
    CUDA). The products are small: (2w-1)² w² h and (2w-1) w⁴ h elements (1M for w = 8, h = 16)."""
    w, h = onehot.shape[0], table.shape[-1]
    t = table.view(2 * w - 1, 2 * w - 1, h)
    e = onehot.to(table.dtype)
    u = (e[:, :, :, None, None] * t[None, None]).sum(2)  # (ra, rb, j, h)
    bias = (e[None, None, :, :, :, None] * u[:, :, None, None]).sum(4)  # (ra, rb, ca, cb, h)
    return bias.permute(4, 0, 2, 1, 3).reshape(h, w * w, w * w)


@functools.lru_cache(maxsize=None)
def _shift_mask_cpu(r: int, w: int, s: int) -> torch.Tensor:
    bands = torch.zeros(r, dtype=torch.long, device="cpu")
    bands[r - w: r - s] = 1
    bands[r - s:] = 2
    region = (bands[:, None] * 3 + bands[None, :]).view(1, r, r, 1).float()
    win = window_partition(region, w).squeeze(-1)  # (nW, w²)
    mask = (win[:, :, None] != win[:, None, :]).float() * SHIFT_MASK_VALUE
    return mask  # (nW, w², w²)


_MASKS: dict = {}


def shift_attention_mask(r: int, w: int, s: int, device) -> torch.Tensor:
    """(nW, w², w²) additive mask for a shifted r x r map (0 within a region, -100 across), cached."""
    key = (r, w, s, str(device))
    m = _MASKS.get(key)
    if m is None:
        m = _shift_mask_cpu(r, w, s).to(device)
        _MASKS[key] = m
    return m


@functools.lru_cache(maxsize=None)
def _window_order_cpu(r: int, w: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.arange(r * r, device="cpu").view(1, r, r, 1)
    if s:
        grid = torch.roll(grid, shifts=(-s, -s), dims=(1, 2))
    order = window_partition(grid, w).reshape(-1).clone()  # token index taken by each window slot
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(r * r, device="cpu")
    return order, inverse


def window_token_order(r: int, w: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse), each (r*r,) int64 on the CPU: window slot j of the shifted, partitioned map holds
    token order[j] of the row-major r x r map, i.e. ``window_partition(roll(x, -s), w)`` equals
    ``x.view(B, r*r, C)[:, order].view(B * nW, w*w, C)``; ``inverse`` undoes it."""
    return _window_order_cpu(r, w, s)


def _take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(1, index)


class _PermuteTokens(torch.autograd.Function):
    """x (B, L, C) -> x[:, order]; backward is a gather along the inverse permutation (no index_add)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return _take_tokens(x, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _take_tokens(grad, inverse), None, None


def permute_tokens(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, L, C) with token j = x[:, order[j]]; ``inverse`` must be order's inverse permutation."""
    return _PermuteTokens.apply(x, order, inverse)


BACKENDS = ("auto", "sdpa", "flash", "reference", "triton")


_WATTN_TRITON = triton_module("window_attention_triton")  # resolved once at import (a constant to torch.compile)
# LAMAMBA_ATTN_BACKEND=<one of BACKENDS> replaces "auto" everywhere (read once, a constant to torch.compile): an
# operator's override, e.g. a whole GPU check with the Triton kernels as if they were the default.
_AUTO_OVERRIDE = os.environ.get("LAMAMBA_ATTN_BACKEND", "").strip() or None
if _AUTO_OVERRIDE is not None and _AUTO_OVERRIDE not in BACKENDS:
    raise ValueError(f"LAMAMBA_ATTN_BACKEND={_AUTO_OVERRIDE!r}: choose one of {', '.join(BACKENDS)}")


def resolve_attn_backend(backend: str) -> str:
    """The backend a call with ``backend`` uses: "auto" becomes LAMAMBA_ATTN_BACKEND when that is set."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return (_AUTO_OVERRIDE or "auto") if backend == "auto" else backend


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func

        return flash_attn_func
    except Exception:
        return None


def window_attention_core(q, k, v, bias, num_windows: int, backend: str = "auto"):
    """Attention inside windows.

    q, k, v: (B * nW, h, N, e). bias: additive (nW', h, N, N) with nW' in {1, nW} (relative-position bias
    plus, for shifted windows, the mask), or None. Returns (B * nW, h, N, e). q is scaled inside.
    """
    bw, h, n, e = q.shape
    scale = e ** -0.5
    if backend == "reference":
        attn = (q * scale) @ k.transpose(-2, -1)  # (B*nW, h, N, N)
        if bias is not None:
            attn = attn.view(-1, bias.shape[0], h, n, n) + bias.unsqueeze(0)
            attn = attn.view(bw, h, n, n)
        return attn.softmax(dim=-1) @ v
    if backend == "flash" and bias is None and _flash_attn_func() is not None and q.is_cuda:
        out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    if backend not in BACKENDS or backend == "triton":  # "triton" enters through window_attention
        known = ", ".join(b for b in BACKENDS if b != "triton")
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {known}")
    mask = None
    if bias is not None:
        nb = bias.shape[0]
        # (B*nW, h, N, N) view of the bias broadcast over the batch (a copy only when nW' > 1).
        mask = bias.to(q.dtype).unsqueeze(0).expand(bw // nb, nb, h, n, n).reshape(bw, h, n, n)
    pad = -e % 8 if q.is_cuda else 0
    if pad:  # see the module docstring: same function, but a fused kernel takes it
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[..., :e]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def window_attention(qkv: torch.Tensor, bias, num_heads: int, backend: str = "auto", order=None) -> torch.Tensor:
    """Attention inside windows from the qkv projection's output: qkv (B * nW, N, 3C), laid out (q, k, v) x heads x
    head dim as ``nn.Linear(C, 3C)`` writes it; bias additive (nW, h, N, N) (window w of image b is row b * nW + w)
    or None. Returns (B * nW, N, C), heads then head dim, the output projection's input.

    With ``order`` (L,), a permutation of the map's L = nW * N tokens (``window_token_order``), qkv is (B, L, 3C) on
    the map's tokens, window w's slot t is token order[w * N + t], and the output is (B, L, C) on the same tokens:
    the "triton" kernels read and write the tokens through ``order`` (no gathers); the other backends gather."""
    backend = resolve_attn_backend(backend)
    if order is not None and backend != "triton":
        if bias is None:
            raise ValueError("window attention: a token order needs the (nW, h, N, N) bias, which gives nW")
        b, length, c3 = qkv.shape
        nw = bias.shape[0]
        out = window_attention(qkv[:, order].reshape(b * nw, length // nw, c3), bias, num_heads, backend)
        return out.reshape(b, length, c3 // 3)[:, torch.argsort(order)]
    bw, n, c3 = qkv.shape
    c = c3 // 3
    if backend == "triton":
        if _WATTN_TRITON is None:
            raise RuntimeError("attention backend 'triton' needs triton (it ships with CUDA builds of torch)")
        if bias is None:
            bias = qkv.new_zeros(1, num_heads, n, n)
        # in qkv's dtype, as SDPA takes it (the kernels add it in fp32): half the bytes a program reads in bf16
        return _WATTN_TRITON.window_attention_triton(qkv, bias.to(qkv.dtype), num_heads, order)
    q, k, v = qkv.view(bw, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, h, N, e)
    nw = bias.shape[0] if bias is not None else 1
    return window_attention_core(q, k, v, bias, nw, backend).transpose(1, 2).reshape(bw, n, c)
