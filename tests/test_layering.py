"""Imports inside lamamba_dist flow one way: entry points -> train/sample/bench -> diffusion/data -> models -> ops,
with the shared leaf modules (errors, config, weights, hashing) below all of them. A module may import its own
layer or lower ones, never a higher one; every module must be placed in a layer here (a new one fails the test
until it is)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lamamba_dist"

# package or module (the first name under lamamba_dist) -> layer, lowest first
LAYERS = {
    "errors": 0, "config": 0, "hashing": 0, "weights": 0, "runlock": 0, "distributed": 0,
    "ops": 1,
    "models": 2,
    "diffusion": 3, "data": 3,
    "train": 4, "sample": 4, "bench": 4, "bench_sample": 4, "parity": 4, "evaluate": 4, "convert": 4,
    "flops": 4, "report": 4, "demo": 4, "model_list": 4,
    "cli": 5,
    "": 5,  # lamamba_dist/__init__.py
}


def _module(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["lamamba_dist", *parts])


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else ""
    assert key in LAYERS, f"{module}: not placed in a layer (tests/test_layering.py LAYERS)"
    return LAYERS[key]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module(path)
        own = _layer(mod)
        for line, name in _imports(path):
            if name == "lamamba_dist" or name.startswith("lamamba_dist."):
                if name != "lamamba_dist" and _layer(name) > own:
                    upward.append(f"{path.relative_to(PKG.parent)}:{line}: {mod} imports {name}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_layering_check_sees_an_upward_import(tmp_path):
    """The check itself: a models module importing the trainer is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom lamamba_dist.train.trainer import Trainer\n")
    found = [(line, name) for line, name in _imports(bad) if name.startswith("lamamba_dist.")]
    assert found == [(2, "lamamba_dist.train.trainer")]
    assert _layer(found[0][1]) > _layer("lamamba_dist.models.dit")
