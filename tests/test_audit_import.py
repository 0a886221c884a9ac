"""The audit library stands alone: it imports no Lightning, nothing else of this repository, and
installs as a package (pyproject.toml) that imports from any directory."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

AUDIT = Path(ROOT) / "audit"
# The project's other packages and scripts: audit/ may import none of them, lazily or not. The namespace's
# own (cxr_relink.models, ...) and the generic names they would have outside it (models, ...).
OTHERS = ("datamodules", "models", "callbacks", "configs")
PROJECT = (*OTHERS, *(f"cxr_relink.{p}" for p in OTHERS), "cxr_relink.evaluation", "cxr_relink.audit_cli",
           "bench", "experiments", "tests", "train", "evaluate")
# Third-party imports allowed anywhere in audit/ (numpy, torch, scipy), and the optional ones allowed
# only inside a function (imported when that feature runs): numba speeds the counting up (with an eager
# fallback), matplotlib draws the plots, torchmetrics scores BLEU/ROUGE, transformers and green_score
# run GREEN's own model.
CORE = {"numpy", "torch", "scipy"}
OPTIONAL = {"numba", "matplotlib", "torchmetrics", "transformers", "green_score"}

# Run from a folder holding a copy of audit/ alone: the repository is not on sys.path, and a finder
# refuses the project's packages even if they are installed (an editable install would hide a violation).
ALONE = """
import importlib, pkgutil, sys
PROJECT = %r
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in PROJECT or '.'.join(name.split('.')[:2]) in PROJECT:
            raise ImportError(f'audit/ imported {name!r}, a package of the project')
sys.meta_path.insert(0, Refuse())
from cxr_relink import audit
assert audit.__file__.startswith(%r), audit.__file__
for m in pkgutil.iter_modules(audit.__path__, 'cxr_relink.audit.'):
    importlib.import_module(m.name)
for name in audit.__all__:
    getattr(audit, name)
import numpy as np
rng = np.random.default_rng(0)
img = rng.normal(size=(60, 8)).astype('float32')
res = audit.relink(img, img + rng.normal(size=(60, 8)).astype('float32'), ns=[10, 'full'], n_boot=20)
assert res.at(k=1, n=10).n == 10 and 0 <= res.at(k=1, n=10).value <= 1
rel = audit.Relinkage(ns=[10, 'full'], n_boot=0, hardneg=False)
assert rel.settings['ns'] == [10, 'full']
third = sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'torchmetrics', 'sklearn'})
assert not third, f'importing audit imported {third}'
print('ok')
"""


def _top(name: str) -> str:
    """The package an import names: its first component, or its first two inside the namespace."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "cxr_relink" else parts[0]


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, at module level?) of every import in ``path``, nested ones included."""
    tree = ast.parse(path.read_text(), str(path))
    lazy = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for sub in ast.walk(node) if sub is not node}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(_top(a.name), node.lineno, id(node) not in lazy) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "cxr_relink" else [f"cxr_relink.{a.name}" for a in node.names]
            out += [(_top(n), node.lineno, id(node) not in lazy) for n in names]
    return out


def test_audit_imports_nothing_of_the_project_statically() -> None:
    """Every import in audit/*.py, inside functions too (a lazy import is still a dependency)."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for path in sorted(AUDIT.glob("*.py")):
        for mod, line, module_level in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {mod}"
            if mod in PROJECT:
                bad.append(where + " (a package of this repository)")
            elif mod in stdlib or mod in CORE or mod == "cxr_relink.audit":
                continue
            elif mod in OPTIONAL:
                if module_level:
                    bad.append(where + " at module level (optional: import it where it is used)")
            else:
                bad.append(where + f" (not numpy/torch/scipy; allowed lazily: {sorted(OPTIONAL)})")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_a_copy_of_audit_alone_imports_and_runs(tmp_path) -> None:
    """Every module of a copy of audit/ alone imports (no Lightning, Hydra, torchmetrics pulled in) and
    the public API runs, in a fresh interpreter (this test process has imported Lightning already)."""
    (tmp_path / "cxr_relink").mkdir()
    shutil.copy(Path(ROOT) / "cxr_relink" / "__init__.py", tmp_path / "cxr_relink")
    shutil.copytree(AUDIT, tmp_path / "cxr_relink" / "audit", ignore=shutil.ignore_patterns("__pycache__"))
    code = ALONE % (PROJECT, str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_public_api_is_exported() -> None:
    from cxr_relink import audit

    assert audit.__all__ and "relink" in audit.__all__
    for name in audit.__all__:
        assert getattr(audit, name) is not None, name


def build_wheel(tmp_path: Path) -> Path:
    """The wheel `pip install .` would install (no network: --no-build-isolation), built from a copy of
    what the packaging reads, so that nothing else of the checkout can leak into it."""
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel")  # older setuptools builds wheels through the `wheel` package
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "setup.py", "README.md", "requirements.txt"):
        shutil.copy(Path(ROOT) / f, src)
    for pkg in ("cxr_relink", "audit", "models", "datamodules", "callbacks", "configs"):
        shutil.copytree(Path(ROOT) / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = wheels.glob("cxr_relink-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_installs_and_imports_from_elsewhere(tmp_path) -> None:
    """Installed into an empty folder, `from cxr_relink import audit` works from another directory, with the
    configs' YAML, and the package knows it is not in a checkout (no repository on its search path)."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
                    "--target", str(target), str(build_wheel(tmp_path))], check=True, capture_output=True, timeout=300)
    code = ("import cxr_relink, sys\n"
            "from cxr_relink import audit, configs\n"
            f"assert audit.__file__.startswith({str(target)!r}), audit.__file__\n"
            f"assert cxr_relink.__path__ == [{str(target / 'cxr_relink')!r}], cxr_relink.__path__\n"
            "assert (configs.CONFIG_DIR / 'evaluate.yaml').exists()\n"
            "print(sorted(audit.__all__))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "relink" in proc.stdout, proc.stderr[-3000:]
