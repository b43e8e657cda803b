"""``lamamba export`` lives in :mod:`lamamba_dist.train.cli`; this module is its CLI registration point."""

from lamamba_dist.train.cli import add_export_parser as add_parser  # noqa: F401
from lamamba_dist.train.cli import run_export  # noqa: F401
