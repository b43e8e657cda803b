"""lamamba_dist: distributed training of LaMamba-Diff and its DiT baseline."""

__version__ = "0.1.0"
