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
# The repository's other top-level packages: audit/ may import none of them, lazily or not.
PROJECT = ("datamodules", "models", "callbacks", "configs", "bench", "experiments", "tests", "train", "evaluate")
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
        if name.split('.')[0] in PROJECT:
            raise ImportError(f'audit/ imported {name!r}, a package of the project')
sys.meta_path.insert(0, Refuse())
from cxr_relink import audit
assert audit.__file__.startswith(%r), audit.__file__
for m in pkgutil.iter_modules(audit.__path__, 'audit.'):
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


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, at module level?) of every import in ``path``, nested ones included."""
    tree = ast.parse(path.read_text(), str(path))
    lazy = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for sub in ast.walk(node) if sub is not node}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], node.lineno, id(node) not in lazy) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], node.lineno, id(node) not in lazy))
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
            elif mod in stdlib or mod in CORE or mod == "audit":
                continue
            elif mod in OPTIONAL:
                if module_level:
                    bad.append(where + " at module level (optional: import it where it is used)")
            else:
                bad.append(where + f" (not numpy/torch/scipy; allowed lazily: {sorted(OPTIONAL)})")
    assert not bad, "\n".join(bad)


def test_a_copy_of_audit_alone_imports_and_runs(tmp_path) -> None:
    """Every module of a copy of audit/ alone imports (no Lightning, Hydra, torchmetrics pulled in) and
    the public API runs, in a fresh interpreter (this test process has imported Lightning already)."""
    shutil.copytree(AUDIT, tmp_path / "audit", ignore=shutil.ignore_patterns("__pycache__"))
    code = ALONE % (PROJECT, str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_public_api_is_exported() -> None:
    from cxr_relink import audit

    assert audit.__all__ and "relink" in audit.__all__
    for name in audit.__all__:
        assert getattr(audit, name) is not None, name


def test_wheel_installs_and_imports_from_elsewhere(tmp_path) -> None:
    """pyproject.toml builds a wheel (no network: --no-build-isolation) holding the five packages and
    the configs' YAML; installed into an empty folder, `import audit` works from another directory."""
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel")  # older setuptools builds wheels through the `wheel` package
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(Path(ROOT) / "pyproject.toml", src)
    shutil.copy(Path(ROOT) / "README.md", src)
    shutil.copy(Path(ROOT) / "requirements.txt", src)
    for pkg in ("audit", "models", "datamodules", "callbacks", "configs"):
        shutil.copytree(Path(ROOT) / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True,
                   capture_output=True, timeout=300)
    (whl,) = wheels.glob("cxr_relink-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(whl)], check=True,
                   capture_output=True, timeout=300)
    code = ("import audit, configs, sys\n"
            f"assert audit.__file__.startswith({str(target)!r}), audit.__file__\n"
            "assert (configs.CONFIG_DIR / 'evaluate.yaml').exists()\n"
            "print(sorted(audit.__all__))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "relink" in proc.stdout, proc.stderr[-3000:]
