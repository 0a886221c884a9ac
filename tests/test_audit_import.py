"""The audit library runs without Lightning: importing every module of audit/ must not import it."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

CHECK = """
import importlib, pkgutil, sys
import audit
assert 'lightning' not in sys.modules
for m in pkgutil.iter_modules(audit.__path__, 'audit.'):
    importlib.import_module(m.name)
bad = [m for m in ('lightning', 'pytorch_lightning') if m in sys.modules]
assert not bad, f'importing audit imported {bad}'
"""


def test_audit_imports_without_lightning() -> None:
    # A fresh interpreter: this test process has imported Lightning already.
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
