"""No import cycles among the project's modules (issue #30, item 4).

The graph is read with `ast`, nothing is imported: one node per module of the project's packages and
top-level scripts (tests/ and bars/ aside), one edge per `import` / `from ... import` anywhere in the
file, at module level or inside a function or an `if TYPE_CHECKING:` block (a lazy import only hides a
circle until the first call). Importing `a.b.c` also runs the `__init__` of `a` and `a.b`, so it adds
edges to those packages too (not to the importer's own packages, which are already running).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cxr_relink import PACKAGES  # the namespace's one list (importing it runs nothing of the project)

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "bars"}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} for the top-level scripts and every package (a folder with __init__.py)."""
    out = {p.stem: p for p in root.glob("*.py")}
    for init in root.glob("*/__init__.py"):
        pkg = init.parent
        if pkg.name in SKIP or pkg.name.startswith("."):
            continue
        # the namespace's packages import as cxr_relink.<name> (cxr_relink/__init__.py)
        prefix = ("cxr_relink",) if pkg.name in PACKAGES else ()
        for p in pkg.rglob("*.py"):
            parts = prefix + p.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _targets(module: str, is_pkg: bool, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importer's package, `level - 1` packages up
            pkg = module.split(".") if is_pkg else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        # `from pkg import name`: a submodule when `pkg.name` is one, else an attribute of `pkg`
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        while name and name not in modules:  # `import a.b.attr`-like names: the module that holds them
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        own = {module.rsplit(".", i)[0] for i in range(module.count(".") + 1)}  # itself and its packages
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(module, path.name == "__init__.py", node, modules):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # the target and the packages whose __init__ it runs
                    name = ".".join(parts[:i])
                    if name in modules and name not in own:
                        edges.add(name)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_cycles_lazy_relative_and_through_package_inits(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import x\n",
        "pkg/b.py": "def f():\n    from . import a\n",  # lazy and relative: still a circle
        "pkg/sub/__init__.py": "from pkg.sub import d\n",
        "pkg/c.py": "import pkg.sub.d\n",  # runs pkg.sub's __init__ too
        "pkg/sub/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import Y\n",
        "pkg/e.py": "import pkg.a\nimport os\n",  # into a cycle, not part of one
        "main.py": "from pkg import e\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    modules = project_modules(tmp_path)
    assert set(modules) == {"main", "pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.e", "pkg.sub", "pkg.sub.d"}
    graph = import_graph(modules)
    assert graph["pkg.c"] == {"pkg.sub", "pkg.sub.d"} and graph["main"] == {"pkg", "pkg.e"}
    assert sorted(cycles(graph)) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub", "pkg.sub.d"]]


def test_no_import_cycles_among_the_projects_modules():
    modules = project_modules()
    graph = import_graph(modules)
    # the walk sees the project: its packages and the known edges between them
    assert {"train", "evaluate", "cxr_relink.audit.relinkage", "cxr_relink.models.dp.features", "cxr_relink.datamodules.synthetic.cohort"} <= set(modules)
    assert "cxr_relink.models.hashing" in graph["cxr_relink.models.external_heads"] and "cxr_relink.audit.result" in graph["cxr_relink.evaluation"]
    found = cycles(graph)
    detail = "\n".join(
        " <-> ".join(c) + ":\n" + "\n".join(f"    {a} imports {b}" for a in c for b in sorted(graph[a]) if b in c)
        for c in found)
    assert not found, f"import cycles among the project's modules (move the shared piece to one home):\n{detail}"


@pytest.mark.slow
def test_nothing_imports_the_generic_top_level_names():
    """Code, tests and scripts reach the project's packages only as cxr_relink.<name>: a bare `import models`
    would load a second copy of a module in a checkout and fail where the wheel is installed."""
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or rel.parts[0] in ("logs", "wandb", "build"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bad += [f"{rel}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert not bad, "\n".join(bad)
