"""Imports inside lamamba_dist flow one way: entry points -> train/sample/bench -> diffusion/data -> models -> ops,
with the shared leaf modules (errors, config, weights, hashing) below all of them. A module may import its own
layer or lower ones, never a higher one; every module must be placed in a layer here (a new one fails the test
until it is)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "lamamba_dist"
# the package's folders: lamamba_dist/ itself, and the two installed inside it (pyproject.toml package-dir)
FOLDERS = {PKG: "lamamba_dist", ROOT / "cluster": "lamamba_dist.cluster",
           ROOT / "data_pipeline": "lamamba_dist.data_pipeline"}

# package or module (the first name under lamamba_dist) -> layer, lowest first
LAYERS = {
    "errors": 0, "config": 0, "hashing": 0, "weights": 0, "runlock": 0, "distributed": 0,
    "ops": 1,
    "models": 2,
    "diffusion": 3, "data": 3,
    "train": 4, "sample": 4, "bench": 4, "parity": 4, "evaluate": 4, "convert": 4,
    "flops": 4, "report": 4, "demo": 4, "model_list": 4, "data_pipeline": 4,
    "cli": 5, "cluster": 5,
    "": 5,  # lamamba_dist/__init__.py
}


def _module(path: Path) -> str:
    folder = next(f for f in FOLDERS if path.is_relative_to(f))
    rel = path.relative_to(folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([FOLDERS[folder], *parts])


def _sources():
    return sorted(p for folder in FOLDERS for p in folder.rglob("*.py"))


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else ""
    assert key in LAYERS, f"{module}: not placed in a layer (tests/e2e/test_layering.py LAYERS)"
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
    for path in _sources():
        mod = _module(path)
        own = _layer(mod)
        for line, name in _imports(path):
            if name == "lamamba_dist" or name.startswith("lamamba_dist."):
                if name != "lamamba_dist" and _layer(name) > own:
                    upward.append(f"{path.relative_to(ROOT)}:{line}: {mod} imports {name}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_layering_check_sees_an_upward_import(tmp_path):
    """The check itself: a models module importing the trainer is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom lamamba_dist.train.trainer import Trainer\n")
    found = [(line, name) for line, name in _imports(bad) if name.startswith("lamamba_dist.")]
    assert found == [(2, "lamamba_dist.train.trainer")]
    assert _layer(found[0][1]) > _layer("lamamba_dist.models.dit")


def _module_level_imports(path: Path, known: set) -> set:
    """The package modules that ``path`` imports when it is imported (statements of the module body; imports
    inside functions run later, when called, and are not part of the import-time graph)."""
    out = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def _circles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_at_import_time():
    paths = {_module(p): p for p in _sources()}
    graph = {m: _module_level_imports(p, set(paths)) - {m} for m, p in paths.items()}
    assert not _circles(graph), f"import circles: {_circles(graph)}"


def test_the_circle_check_sees_a_circle(tmp_path):
    (tmp_path / "a.py").write_text("from pkg import b\n")
    (tmp_path / "b.py").write_text("import os\nfrom pkg.a import thing\n\ndef later():\n    from pkg import c\n")
    (tmp_path / "c.py").write_text("import pkg.b\n")
    known = {"pkg.a", "pkg.b", "pkg.c"}
    graph = {f"pkg.{n}": _module_level_imports(tmp_path / f"{n}.py", known) for n in "abc"}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.b"}}
    assert _circles(graph) == [["pkg.a", "pkg.b"]]
