"""Packaging glue that pyproject.toml cannot express: the repository keeps its packages at the top level
(audit/, models/, ...), the wheel installs them inside one `cxr_relink` package, so that site-packages never
gains generic names like `models` or `audit` (cxr_relink/__init__.py does the same mapping in a checkout).
The package list is computed, so a new sub-package is never left out of the wheel."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# cxr_relink.PACKAGES, read without importing the package (a build may run without the project's deps)
namespace = {}
exec(next(line for line in (HERE / "cxr_relink" / "__init__.py").read_text().splitlines()
          if line.startswith("PACKAGES = ")), namespace)
PACKAGES = namespace["PACKAGES"]

setup(
    packages=["cxr_relink"] + [f"cxr_relink.{p}" for top in PACKAGES
                               for p in find_packages(str(HERE), include=[top, f"{top}.*"])],
    package_dir={"cxr_relink": "cxr_relink", **{f"cxr_relink.{top}": top for top in PACKAGES}},
    package_data={"cxr_relink.configs": ["**/*.yaml"]},
)
