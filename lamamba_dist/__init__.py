"""lamamba_dist: distributed training of LaMamba-Diff and its DiT baseline.

The Slurm launcher (folder ``cluster/``) and the Ray preprocessing (folder ``data_pipeline/``) are part of this
package: ``lamamba_dist.cluster`` and ``lamamba_dist.data_pipeline``. An installation maps the folders there
(pyproject.toml ``[tool.setuptools.package-dir]``); nothing is installed as a top-level ``cluster`` or
``data_pipeline``. A source checkout used without installation (its root on ``PYTHONPATH``) resolves the two names
the same way through :class:`_CheckoutFolders`, which only answers where nothing else has.
"""

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

# subpackage -> its folder beside this package in the repository (kept equal to pyproject.toml's package-dir)
_FOLDERS = {"lamamba_dist.cluster": "cluster", "lamamba_dist.data_pipeline": "data_pipeline"}


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    """``lamamba_dist.cluster`` / ``lamamba_dist.data_pipeline`` from the folders beside the package, in a source
    checkout without installation. Appended last to ``sys.meta_path``: an installation (a copy inside the
    package, or an editable install's finder) is found first."""

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        folder = _FOLDERS.get(fullname)
        if folder is None:
            return None
        init = os.path.join(self.root, folder, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(fullname, init,
                                                      submodule_search_locations=[os.path.dirname(init)])


def _install_checkout_finder() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return  # an installed copy: the folders are inside the package
    if not any(isinstance(f, _CheckoutFolders) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutFolders(root))


_install_checkout_finder()
