"""How the package is installed: cluster/ and data_pipeline/ inside our namespace (lamamba_dist.cluster,
lamamba_dist.data_pipeline), never as top-level modules that a user's own `cluster` could collide with."""

import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import lamamba_dist

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_pyproject_lists_every_package_folder_under_our_namespace():
    st = _pyproject()
    mapped = st["package-dir"]
    assert mapped == {name: folder for name, folder in lamamba_dist._FOLDERS.items()}  # the checkout finder agrees
    folders = {"lamamba_dist": ROOT / "lamamba_dist", **{n: ROOT / f for n, f in mapped.items()}}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            if "__pycache__" not in rel:
                found.add(".".join([name, *rel]))
    assert set(st["packages"]) == found
    assert all(p == "lamamba_dist" or p.startswith("lamamba_dist.") for p in st["packages"])


def _run(args: list, cwd: Path, env=None):
    """This interpreter with ``args`` in ``cwd``; the environment without PYTHONPATH unless ``env`` is given."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_installed_package_has_no_top_level_cluster_or_data_pipeline(tmp_path):
    """In the installed environment, from another folder: ours under lamamba_dist only."""
    res = _run(["-c", "import lamamba_dist.cluster.job, lamamba_dist.data_pipeline.images as i; "
                "print(lamamba_dist.cluster.job.__file__); print(i.__file__)"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(ROOT / "cluster" / "job.py"), str(ROOT / "data_pipeline" / "images.py")]
    for name in ("cluster", "data_pipeline"):
        res = _run(["-c", f"import {name}"], tmp_path)
        assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, (name, res.stdout, res.stderr)


def test_a_source_checkout_without_installation_resolves_the_same_names(tmp_path):
    """PYTHONPATH=<checkout> and no installation (as on a machine that runs the tree as copied; ``-S`` leaves the
    installed editable finder out): lamamba_dist/__init__.py maps the two folders."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    res = _run(["-S", "-c", "import lamamba_dist.cluster.slurm as s, lamamba_dist.data_pipeline as d; "
                "print(s.__file__); print(d.__path__[0])"],
               tmp_path, env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(ROOT / "cluster" / "slurm.py"), str(ROOT / "data_pipeline")]
