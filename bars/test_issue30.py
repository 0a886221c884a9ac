"""Issue #30 acceptance: the three import circles are gone, the reproduction is no longer one file of more than
600 lines, the wheel installs no generic top-level name (only `cxr_relink`) and its console command audits an
embeddings file from another directory, and a `slow` marker splits the suite into a fast tier.

Each check reads the repository (AST, file sizes, a built wheel, pytest's own collection), not the code under
test's opinion of itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.test_audit_import import build_wheel
from tests.test_import_graph import cycles, import_graph, project_modules

ROOT = Path(__file__).resolve().parents[1]
GENERIC = {"models", "configs", "callbacks", "datamodules", "audit"}


def _reaches(graph: dict[str, set[str]], a: str, b: str) -> bool:
    seen, todo = set(), [a]
    while todo:
        m = todo.pop()
        if m == b:
            return True
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    return False


def test_the_three_import_circles_are_gone() -> None:
    graph = import_graph(project_modules())
    assert not cycles(graph)
    # The three circles, by the files that formed them wherever they live now: neither side reaches
    # the other's module through any chain of imports.
    by_file = {str(p.relative_to(ROOT)): m for m, p in project_modules().items()}
    pairs = [("audit/green_model.py", "audit/report_quality.py"),
             ("models/dp/features.py", "models/external_heads.py")]
    synthetic = [f for f in by_file if f.startswith("datamodules/synthetic") and f.endswith(".py")]
    sampling = [f for f in synthetic if "sampling" in f]
    assert sampling, "the synthetic study sampler moved out of datamodules/synthetic*"
    pairs += [(s, t) for s in synthetic for t in sampling if s != t and not s.endswith("__init__.py")]
    for a, b in pairs:
        if a in by_file and b in by_file:
            assert not (_reaches(graph, by_file[a], by_file[b]) and _reaches(graph, by_file[b], by_file[a])), (a, b)


def test_the_reproduction_is_not_one_file_of_more_than_600_lines() -> None:
    files = sorted((ROOT / "experiments").glob("reproduce*.py")) + sorted((ROOT / "experiments").glob("reproduce*/*.py"))
    assert files
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > 600}
    assert not long, long


@pytest.mark.slow
def test_the_wheel_installs_only_the_project_namespace_and_its_command_audits_a_file(tmp_path) -> None:
    whl = build_wheel(tmp_path)
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert tops == {"cxr_relink"}, tops
    assert not tops & GENERIC
    assert {f"cxr_relink/{p}/__init__.py" for p in GENERIC} <= set(names)
    assert "cxr-relink-audit = cxr_relink.audit_cli:main" in entry

    # Installed beside nothing of the checkout, the command audits an embeddings file (the audit library alone).
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
                    "--target", str(site), str(whl)], check=True, capture_output=True, timeout=300)
    work = tmp_path / "work"
    work.mkdir()
    rng = np.random.default_rng(0)
    img = rng.normal(size=(120, 16)).astype("float32")
    np.savez(work / "emb.npz", image_emb=img, report_emb=img + rng.normal(size=img.shape).astype("float32"),
             study_id=np.arange(120), patient_id=np.arange(120) // 2)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CXR_RELINK_ROOT")}
    env["PYTHONPATH"] = str(site)
    cmd = [sys.executable, "-c", "from cxr_relink.audit_cli import main; main()", "emb.npz", "--out", "out",
           "audit.relinkage.n_boot=20"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "out" / "audit.json").exists() and "× chance" in proc.stdout + proc.stderr
    assert not any((site / "cxr_relink").glob("logs")), "the command wrote logs into the installed package"
    again = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # an existing audit is never overwritten


def _collected(marker: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", marker, "-p", "no:cacheprovider",
                           "tests"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {line.split("[")[0] for line in proc.stdout.splitlines() if "::" in line}


@pytest.mark.slow
def test_a_slow_marker_splits_the_suite() -> None:
    slow, fast = _collected("slow"), _collected("not slow")
    assert slow and fast and not slow & fast
    # the three slowest end-to-end runs are in the slow tier
    for test in ("tests/test_reproduce.py::test_tiny_reproduction_has_every_claim_row",
                 "tests/test_resume.py::test_interrupted_and_resumed_run_equals_the_uninterrupted_one",
                 "tests/test_audit_callbacks.py::test_two_process_gloo_equals_single_process"):
        assert test in slow, test
    # .ci/run runs everything: no marker filter there
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pytest -q" in ci and "-m" not in ci.split("pytest", 1)[1].splitlines()[0]

