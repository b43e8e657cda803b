"""LaMamba-Diff: a U-shaped latent diffusion backbone whose blocks chain a 2D Mamba scan (SS2D over four
snake paths, global context) and Swin window attention (local detail), conditioned by adaLN.

Follows docs/model.md section by section; parameter names equal the official state-dict keys
(minus the buffers ``relative_position_index`` and ``attn_mask``, which we recompute and cache in
``lamamba_dist.ops``), so importing an official checkpoint is a key check, not a rename.
Maps are channels-last (B, H, W, C) inside the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lamamba_dist.models.common import LabelEmbedder, TimestepEmbedder, modulate, sincos_2d
from lamamba_dist.ops import (
    cross_merge,
    cross_scan,
    relative_offset_onehot,
    relative_position_bias,
    selective_scan,
    shift_attention_mask,
    snake_tables,
    permute_tokens,
    window_attention,
    window_token_order,
)
from lamamba_dist.ops.dwconv import dwconv_silu
from lamamba_dist.ops.selective_scan import SS2D_BACKENDS, resolve_backend, scan_kernel, ss2d_scan
from lamamba_dist.ops.ss2d_core import resolve_core, ss2d_core
from lamamba_dist.ops.window_attention import resolve_attn_backend


@dataclass(frozen=True)
class LaMambaArch:
    """Architecture hyper-parameters (docs/model.md §9). Widths are [C0, 2C0, 4C0, 4C0]."""

    base_width: int = 320
    depths: tuple = (2, 2, 2, 2)  # encoder stages; decoder stage j has depths[3 - j] + 1 blocks
    mid_depth: int = 2
    num_heads: int = 16
    window_size: int = 8
    d_state: int = 1
    ssm_ratio: float = 2.0
    d_conv: int = 3
    mlp_ratio: float = 4.0
    widths: tuple = field(init=False)

    def __post_init__(self):
        c0 = self.base_width
        object.__setattr__(self, "widths", (c0, 2 * c0, 4 * c0, 4 * c0))
        if c0 % 4:
            raise ValueError(f"base_width must be divisible by 4 (2D sin-cos), got {c0}")
        for w in self.widths:
            if w % self.num_heads:
                raise ValueError(f"width {w} is not divisible by num_heads {self.num_heads}")


# ----------------------------------------------------------------------------- SS2D


class SS2D(nn.Module):
    """VMamba v2 selective-scan 2D over the four snake paths (docs/model.md §3). Channels-last in and out."""

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 2.0, d_conv: int = 3, scan_backend: str = "auto",
                 resolution: int | None = None, lean_scan_backward: bool = True, conv_backend: str = "auto",
                 snake_backend: str = "auto", scan_core: str = "auto"):
        super().__init__()
        # With a kernel that has its own backward (mamba-ssm's or the Triton one), run the scan core through
        # ss2d_core: the backward keeps x and the rank-R deltas, not the (B, 4, D, L) snake copies and deltas.
        self.lean_scan_backward = lean_scan_backward
        if resolution is not None:  # snake tables as non-persistent buffers: built once, follow .to(device)
            dev = torch.get_default_device()  # the construction context (cpu, or meta for counting)
            paths, inverse = snake_tables(resolution)
            self.register_buffer("scan_paths", paths.to(dev, copy=True), persistent=False)
            self.register_buffer("scan_inverse", inverse.to(dev, copy=True), persistent=False)
        d_inner = int(ssm_ratio * dim)
        rank = math.ceil(dim / 16)  # dt_rank "auto" is computed from C, not D
        k = 4
        self.d_inner, self.rank, self.d_state, self.k = d_inner, rank, d_state, k
        self.scan_backend = scan_backend
        self.conv_backend = conv_backend  # the depthwise conv + SiLU (ops/dwconv.py)
        self.snake_backend = snake_backend  # the merge of the four directions and its adjoint (ops/cross_scan.py)
        resolve_core(scan_core)  # checked at construction
        self.scan_core = scan_core  # how the lean core reaches autograd (ops/ss2d_core.py CORES)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=False)
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4):
        """docs/model.md §7: x_proj default Linear init, dt_proj U(±R^-½), inverse-softplus dt bias, S4D-real A, D = 1."""
        bound = 1.0 / math.sqrt(self.d_inner)
        self.x_proj_weight.uniform_(-bound, bound)
        self.dt_projs_weight.uniform_(-self.rank ** -0.5, self.rank ** -0.5)
        dt = torch.exp(torch.rand(self.k, self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.k * self.d_inner, 1)
        self.A_logs.copy_(torch.log(a))
        self.Ds.fill_(1.0)

    def _gathered_tables(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(paths, inverse) for an n x n map: the module's buffers when built for n, else the per-device cache."""
        if hasattr(self, "scan_paths") and self.scan_paths.shape[-1] == n * n:
            return self.scan_paths, self.scan_inverse
        return snake_tables(n, device)

    def _forward_gathered(self, u: torch.Tensor, backend: str) -> torch.Tensor:
        """The "ss2d_*" backends: the same function, computed channels-last with the scan gathered from the grid.

        The x and dt projections act per position, so they are applied to the map itself (grid layout, no
        (B, 4, D, L) copy): x_dbl (B, L, 4(R+2N)) with the rows of x_proj_weight reordered [dt ranks of the four
        directions | B of the four | C of the four], and dts (B, L, 4, D) as one GEMM with the block-diagonal
        (4R, 4D) matrix whose block k is dt_projs_weight[k]^T. ss2d_scan reads each direction's steps at its grid
        positions and returns sum_k y_k already channels-last, so there is no cross_merge and no transpose.
        """
        b, h, w, _ = u.shape
        n, r, d, k = self.d_state, self.rank, self.d_inner, self.k
        if n != 1:
            raise ValueError(f"scan backend {backend!r} is for d_state 1, got d_state {n}")
        if h != w:
            raise ValueError(f"snake scan needs a square map, got {h}x{w}")
        length = h * w
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, H, W, D) each: first D -> x, last D -> z
        z = F.silu(z)
        x_cl = dwconv_silu(x, self.conv2d.weight, out_bdl=False, backend=self.conv_backend).view(b, length, d)
        tables = self._gathered_tables(h, u.device)
        wx = self.x_proj_weight.to(x_cl.dtype)  # (K, R+2N, D)
        w_all = torch.cat([wx[:, :r].reshape(k * r, d), wx[:, r:r + n].reshape(k * n, d),
                           wx[:, r + n:].reshape(k * n, d)], dim=0)
        x_dbl = F.linear(x_cl, w_all)  # (B, L, K*R + 2*K*N)
        dts_r, bs, cs = torch.split(x_dbl, [k * r, k * n, k * n], dim=-1)
        w_dt = torch.block_diag(*self.dt_projs_weight.to(x_cl.dtype).transpose(1, 2).unbind(0))  # (K*R, K*D)
        dts = torch.matmul(dts_r, w_dt).view(b, length, k, d)  # (B, L, K, D)
        a = -torch.exp(self.A_logs.float())  # (4D, 1)
        y = ss2d_scan(x_cl, dts, bs, cs, a, self.Ds.float(), self.dt_projs_bias.float().reshape(-1),
                      tables[0], tables[1], delta_softplus=True, backend=backend)  # (B, L, D)
        y = self.out_norm(y.view(b, h, w, d)).to(u.dtype) * z
        return self.out_proj(y)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        backend = resolve_backend(self.scan_backend)
        if backend in SS2D_BACKENDS:
            return self._forward_gathered(u, backend)
        b, h, w, _ = u.shape
        n, r, d, k = self.d_state, self.rank, self.d_inner, self.k
        length = h * w
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, H, W, D) each: first D -> x, last D -> z
        z = F.silu(z)
        a = -torch.exp(self.A_logs.float())  # (4D, N)
        kernel = scan_kernel(self.scan_backend, x, n, length=length)
        lean = self.lean_scan_backward and kernel != "reference"
        # The core as custom ops reads the conv's output channels-last (B, H, W, D): its gathers into the four
        # sequences and back are then the snake kernels (inside the op, nothing fuses them with their neighbours).
        # The traced core and the plain path take (B, D, H, W), gathered along L by Inductor or torch.
        cl = lean and resolve_core(self.scan_core) == "op"
        x = dwconv_silu(x, self.conv2d.weight, out_bdl=not cl, backend=self.conv_backend)
        if lean:
            paths, inverse = self._gathered_tables(h, x.device)
            y = ss2d_core(x.reshape(b, length, d) if cl else x.reshape(b, d, length), self.x_proj_weight,
                          self.dt_projs_weight, a, self.Ds, self.dt_projs_bias.reshape(-1), paths, inverse, kernel,
                          self.snake_backend, channels_last=cl, core=self.scan_core).view(b, h, w, d)
        else:
            y = self._scan_core_plain(x, a).transpose(1, 2).reshape(b, h, w, d)
        y = self.out_norm(y).to(u.dtype) * z
        return self.out_proj(y)

    def _scan_core_plain(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, D, L) by plain autograd: cross_scan, projections, selective_scan, cross_merge."""
        b, d, h, w = x.shape
        n, r, k, length = self.d_state, self.rank, self.k, h * w
        tables = self._gathered_tables(h, x.device)  # the module's buffers (4, L) when built for this map
        xs = cross_scan(x, tables)  # (B, 4, D, L)
        # Batched over (B, K) with the weights broadcast: xs is read in place (an einsum over k would
        # permute it into a (K, B*L, D) copy first).
        x_dbl = torch.matmul(self.x_proj_weight.to(xs.dtype), xs)  # (K, R+2N, D) @ (B, K, D, L) -> (B, K, R+2N, L)
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.matmul(self.dt_projs_weight.to(xs.dtype), dts)  # (K, D, R) @ (B, K, R, L) -> (B, K, D, L)
        ys = selective_scan(
            xs.reshape(b, k * d, length), dts.reshape(b, k * d, length), a, bs, cs,
            self.Ds.float(), self.dt_projs_bias.float().reshape(-1), delta_softplus=True, backend=self.scan_backend,
        )  # (B, 4D, L)
        return cross_merge(ys.view(b, k, d, length), h, tables)  # (B, D, L): sum of the four directions


# ----------------------------------------------------------------------------- window attention


class WindowAttention(nn.Module):
    """W-MSA / SW-MSA on a fixed r x r map (docs/model.md §5). Window clipped to r when r <= window."""

    def __init__(self, dim: int, num_heads: int, resolution: int, window_size: int, shift: int, attn_backend: str = "auto"):
        super().__init__()
        if resolution <= window_size:
            window_size, shift = resolution, 0
        if resolution % window_size:
            raise ValueError(f"map side {resolution} is not a multiple of the window {window_size}")
        self.dim, self.num_heads, self.resolution = dim, num_heads, resolution
        self.window_size, self.shift = window_size, shift
        self.attn_backend = attn_backend
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        # Geometry as non-persistent buffers (recomputed, never saved): constants to torch.compile.
        dev = torch.get_default_device()
        self.register_buffer("rel_onehot", relative_offset_onehot(window_size, "cpu").to(dev), persistent=False)
        # The additive shift mask, all zeros for unshifted blocks: both kinds of block then run the same code
        # on the same shapes, so regional compilation builds one graph for the pair instead of two.
        n_win = (resolution // window_size) ** 2
        mask = shift_attention_mask(resolution, window_size, shift, "cpu") if shift else \
            torch.zeros(n_win, window_size ** 2, window_size ** 2, device="cpu")
        self.register_buffer("shift_mask", mask.to(dev, copy=True), persistent=False)
        # Cyclic shift + window partition as one token permutation (and its inverse for the way back).
        order, inverse = window_token_order(resolution, window_size, shift)
        self.register_buffer("token_order", order.to(dev, copy=True), persistent=False)
        self.register_buffer("token_inverse", inverse.to(dev, copy=True), persistent=False)

    def attention_bias(self) -> torch.Tensor:
        """(nW, h, N, N): relative-position bias + the shift mask (zeros for unshifted windows)."""
        bias = relative_position_bias(self.relative_position_bias_table, self.rel_onehot)  # (h, N, N)
        return bias.unsqueeze(0) + self.shift_mask.unsqueeze(1).to(bias.dtype)  # (nW, h, N, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if h != self.resolution or w != self.resolution:
            raise ValueError(f"window attention built for a {self.resolution}x{self.resolution} map, got {h}x{w}")
        if resolve_attn_backend(self.attn_backend) == "triton":  # the kernels read the tokens through the order
            qkv = self.qkv(x.reshape(b, h * w, c))  # (qkv and proj act per token: they commute with the order)
            out = window_attention(qkv, self.attention_bias(), self.num_heads, "triton", order=self.token_order)
            return self.proj(out).view(b, h, w, c)
        ws = self.window_size
        n = ws * ws
        bw = b * (h // ws) * (w // ws)
        # roll(-shift) + window partition in one gather: (B, H*W, C) -> (B*nW, N, C)
        win = permute_tokens(x.reshape(b, h * w, c), self.token_order, self.token_inverse).view(bw, n, c)
        out = self.proj(window_attention(self.qkv(win), self.attention_bias(), self.num_heads, self.attn_backend))
        # window reverse + roll(+shift) in one gather
        return permute_tokens(out.view(b, h * w, c), self.token_inverse, self.token_order).view(b, h, w, c)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf form
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------- block and stages


class LaMambaBlock(nn.Module):
    """x += g_ssm * SS2D(mod(LN x)); x += g_attn * WinAttn(mod(LN x)); x += g_mlp * MLP(mod(LN x)) (docs/model.md §2)."""

    def __init__(self, dim: int, cond_dim: int, resolution: int, arch: LaMambaArch, shift: int, project_condition: bool,
                 scan_backend: str = "auto", attn_backend: str = "auto", lean_scan_backward: bool = True,
                 conv_backend: str = "auto", snake_backend: str = "auto", scan_core: str = "auto"):
        super().__init__()
        self.condition_projection = nn.Linear(cond_dim, dim) if project_condition else nn.Identity()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, arch.d_state, arch.ssm_ratio, arch.d_conv, scan_backend, resolution, lean_scan_backward,
                       conv_backend, snake_backend, scan_core)
        self.norm_swin = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, arch.num_heads, resolution, arch.window_size, shift, attn_backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * arch.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        m = self.adaLN_modulation(self.condition_projection(c))[:, None, None, :]  # (B, 1, 1, 9C)
        (sh_ssm, sc_ssm, g_ssm, sh_att, sc_att, g_att, sh_mlp, sc_mlp, g_mlp) = m.chunk(9, dim=-1)
        x = x + g_ssm * self.op(modulate(self.norm(x), sh_ssm, sc_ssm))
        x = x + g_att * self.attn(modulate(self.norm_swin(x), sh_att, sc_att))
        x = x + g_mlp * self.mlp(modulate(self.norm2(x), sh_mlp, sc_mlp))
        return x


class PatchMerging(nn.Module):
    """r -> r/2, C -> 2C: concat (0,0),(1,0),(0,1),(1,1) offsets, LN(4C), Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpanding(nn.Module):
    """r -> 2r, C -> C/2 (or C with factor 1): Linear expand (no bias), pixel-shuffle (p1 p2 c), LN."""

    def __init__(self, dim: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        out = 2 * dim if factor == 2 else dim
        self.expand = nn.Linear(dim, out, bias=False)
        self.norm = nn.LayerNorm(out // (factor * factor))

    def forward(self, x):
        x = self.expand(x)
        if self.factor > 1:
            b, h, w, c = x.shape
            f = self.factor
            x = x.view(b, h, w, f, f, c // (f * f)).permute(0, 1, 3, 2, 4, 5).reshape(b, h * f, w * f, c // (f * f))
        return self.norm(x)


class Stage(nn.Module):
    def __init__(self, blocks, downsample=None, upsample=None):
        super().__init__()
        if upsample is not None:
            self.upsample = upsample
        self.blocks = nn.ModuleList(blocks)
        if downsample is not None:
            self.downsample = downsample


# ----------------------------------------------------------------------------- the network


class LaMambaDiff(nn.Module):
    def __init__(self, arch: LaMambaArch, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 class_dropout: float = 0.1, learn_sigma: bool = True, grad_checkpointing: bool = False,
                 scan_backend: str = "auto", attn_backend: str = "auto", lean_scan_backward: bool = True,
                 conv_backend: str = "auto", snake_backend: str = "auto", scan_core: str = "auto"):
        super().__init__()
        self.arch = arch
        self.latent_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing
        if input_size % 4:
            raise ValueError(f"latent size must be divisible by 4 (two patch merges), got {input_size}")
        widths = arch.widths
        c0, cc = widths[0], widths[-1]
        res = [input_size, input_size // 2, input_size // 4, input_size // 4]
        shift = arch.window_size // 2

        def make_blocks(depth, dim, r, force_proj):
            return [LaMambaBlock(dim, cc, r, arch, shift if i % 2 else 0, force_proj or dim != cc,
                                 scan_backend, attn_backend, lean_scan_backward, conv_backend, snake_backend, scan_core)
                    for i in range(depth)]

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, c0, kernel_size=1)
        self.patch_embed.norm = nn.LayerNorm(c0)
        self.pos_embed = nn.Parameter(torch.zeros(1, input_size, input_size, c0))
        self.t_embedder = TimestepEmbedder(cc)
        self.y_embedder = LabelEmbedder(num_classes, cc, class_dropout)

        self.layers = nn.ModuleList(
            Stage(make_blocks(arch.depths[i], widths[i], res[i], False),
                  downsample=PatchMerging(widths[i]) if i < 2 else None)
            for i in range(4)
        )
        self.mid_layer = Stage(make_blocks(arch.mid_depth, cc, res[3], False))
        self.layers_up = nn.ModuleList(
            Stage(make_blocks(arch.depths[3 - j] + 1, widths[3 - j], res[3 - j], True),
                  upsample=PatchExpanding(widths[4 - j]) if j >= 2 else None)
            for j in range(4)
        )
        self.final_up = PatchExpanding(c0, factor=1)
        self.final_condition_projection = nn.Linear(cc, c0)
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c0, 2 * c0))
        self.norm_final = nn.LayerNorm(c0, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(c0, self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------ init (docs/model.md §7)
    @torch.no_grad()
    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):  # every Linear: xavier-uniform, bias 0
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, SS2D):
                m.reset_ssm_parameters()  # conv2d keeps PyTorch's default init (fan_in 9)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
        c0 = self.arch.widths[0]
        self.pos_embed.copy_(torch.from_numpy(sincos_2d(c0, self.latent_size)).float().view_as(self.pos_embed))
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in self.modules():  # adaLN-Zero in every block and the head; final_linear stays xavier (official)
            if isinstance(m, LaMambaBlock):
                nn.init.zeros_(m.adaLN_modulation[1].weight)
                nn.init.zeros_(m.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_adaLN_modulation[1].bias)

    # ------------------------------------------------------------------ forward
    def _run_blocks(self, stage: Stage, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for blk in stage.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(blk, h, c, use_reentrant=False)
            else:
                h = blk(h, c)
        return h

    def check_input(self, x: torch.Tensor) -> None:
        s = self.latent_size
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(f"expected latents of shape (B, {self.in_channels}, {s}, {s}), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, 4, S, S), t (B,), y (B,) -> (B, 8, S, S): ε (channels 0-3) and variance values v (4-7)."""
        self.check_input(x)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, Cc)
        h = self.patch_embed.proj(x).permute(0, 2, 3, 1)  # (B, S, S, C0)
        h = self.patch_embed.norm(h) + self.pos_embed.to(h.dtype)
        skips = []
        for i, stage in enumerate(self.layers):
            h = self._run_blocks(stage, h, c)
            skips.append(h)  # taken before downsampling
            if i < 2:
                # Keep the residual stream's dtype across the merge (under autocast its Linear returns bf16
                # while stage 0 carries fp32): one input dtype per block shape, so regional compilation
                # builds one graph per shape. In pure bf16 or fp32 this is a no-op.
                h = stage.downsample(h).to(h.dtype)
        h = h + self._run_blocks(self.mid_layer, h, c)  # extra outer residual around the bottleneck
        for j, stage in enumerate(self.layers_up):
            if j >= 2:
                h = stage.upsample(h)
            h = h + skips[3 - j]
            h = self._run_blocks(stage, h, c)
        shift, scale = self.final_adaLN_modulation(self.final_condition_projection(c)).chunk(2, dim=-1)
        h = self.final_up(h)
        h = modulate(self.norm_final(h), shift[:, None, None], scale[:, None, None])
        return self.final_linear(h).permute(0, 3, 1, 2)  # (B, 8, S, S)
