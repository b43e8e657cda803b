"""`lamamba models`: the registered model sizes (lamamba_dist/models/registry.py)."""

from __future__ import annotations


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text, description="List the registered model sizes.")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from lamamba_dist.models import MODELS

    for n, (family, arch) in MODELS.items():
        print(f"{n:16s} {family:8s} {arch}")
    return 0
