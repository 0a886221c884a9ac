"""cxr-relink's one import namespace: ``cxr_relink.audit``, ``cxr_relink.models``, ``cxr_relink.datamodules``,
``cxr_relink.callbacks``, ``cxr_relink.configs``.

The repository keeps those packages at its top level (the layout of a research repo: ``models/`` next to
``train.py``), but generic names like ``models`` or ``audit`` in site-packages would collide with a user's
own code. So code imports them only through this package, which finds them in two ways:

* installed (``pip install .``): the wheel puts them inside this package (pyproject.toml's ``package-dir``);
* in a checkout (``python train.py``, ``pytest``, ``python -m experiments.reproduce``): this file adds the
  repository root to the package's search path, so ``cxr_relink.models`` is ``<repo>/models``.

Nothing imports the generic top-level names: tests/test_import_graph.py checks it.
"""

from pathlib import Path

# The project's packages, the one list (pyproject.toml's package-dir names the same five).
PACKAGES = ("audit", "callbacks", "configs", "datamodules", "models")

_repo = Path(__file__).resolve().parent.parent
# A checkout is recognised by its own pyproject.toml beside a models/ package; an installed copy sits in
# site-packages, whose parent holds neither, so nothing outside the package is ever searched there.
if (_repo / "pyproject.toml").is_file() and (_repo / "models" / "__init__.py").is_file():
    __path__.append(str(_repo))  # noqa: F821  (__path__ is defined for packages)
