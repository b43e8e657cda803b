"""The configurations of ``lamamba bench train``: a matrix of config overrides (pure functions, no torch;
tests/bench/test_bench_train.py)."""

from __future__ import annotations

import itertools

# Short matrix axis names -> config keys. Any "section.key" works as an axis too.
AXES = {
    "zero": "train.zero_stage",
    "gc": "model.grad_checkpointing",
    "micro": "train.micro_batch",
    "model": "model.name",
    "res": "model.resolution",
    "precision": "train.precision",
}
SPECIAL_AXES = ("config", "accum")


# --------------------------------------------------------------------------- matrix


def parse_matrix(spec: str) -> list[dict[str, str]]:
    """``"zero=1,2;gc=false,true"`` -> the cartesian product as dicts (first axis slowest), values as written."""
    axes: list[tuple[str, list[str]]] = []
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"matrix axis {part!r}: expected name=value[,value...]")
        name, values = part.split("=", 1)
        name = name.strip()
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not name or not vals:
            raise ValueError(f"matrix axis {part!r}: expected name=value[,value...]")
        if name not in AXES and name not in SPECIAL_AXES and "." not in name:
            raise ValueError(f"matrix axis {name!r}: use one of {', '.join([*AXES, *SPECIAL_AXES])} or section.key")
        if any(name == n for n, _ in axes):
            raise ValueError(f"matrix axis {name!r} given twice")
        axes.append((name, vals))
    if not axes:
        return [{}]
    return [dict(zip([n for n, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def expand(configs: list[str], matrices: list[str]) -> list[tuple[str, dict[str, str]]]:
    """(config path, combo) per row: each matrix in order; a matrix without a ``config`` axis runs on every --config."""
    rows: list[tuple[str, dict[str, str]]] = []
    for spec in matrices or [""]:
        combos = parse_matrix(spec)
        if any("config" in c for c in combos):
            rows += [(c["config"], {k: v for k, v in c.items() if k != "config"}) for c in combos]
        else:
            if not configs:
                raise ValueError(f"matrix {spec!r} has no config axis and no --config was given")
            rows += [(path, c) for path in configs for c in combos]
    return rows
