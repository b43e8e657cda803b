"""Ops with one dispatch point each and a pure-PyTorch reference beside every fast path."""

from lamamba_dist.ops.cross_scan import cross_merge, cross_merge_reference, cross_scan, cross_scan_reference, snake_tables
from lamamba_dist.ops.selective_scan import (
    fused_available,
    selective_scan,
    selective_scan_reference,
    ss2d_scan,
    ss2d_scan_reference,
)
from lamamba_dist.ops.window_attention import (
    permute_tokens,
    relative_offset_onehot,
    relative_position_bias,
    relative_position_index,
    shift_attention_mask,
    window_attention,
    window_attention_core,
    window_partition,
    window_reverse,
    window_token_order,
)

__all__ = [
    "cross_scan", "cross_merge", "cross_scan_reference", "cross_merge_reference", "snake_tables",
    "selective_scan", "selective_scan_reference", "fused_available", "ss2d_scan", "ss2d_scan_reference",
    "relative_position_index", "relative_offset_onehot", "relative_position_bias", "shift_attention_mask", "window_attention", "window_attention_core", "window_partition", "window_reverse",
    "permute_tokens", "window_token_order",
]
