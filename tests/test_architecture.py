"""The house's structure, checked: no import circle between files or between sibling packages, no
camserve import inside a function except for an optional extra, one method registry, and the
import contracts of ``.importlinter`` (layers and independence, run by ``lint-imports``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "camserve"
#: camserve modules that need an optional extra (kserve, ray, view) and may therefore be imported lazily
OPTIONAL_EXTRAS = ("camserve.kserve", "camserve.cli.batch_ray", "camserve.view")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("camserve")


def strongly_connected(nodes: Set[str], edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's components of more than one node (each one an import circle)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_between_files(graph):
    modules = set(graph.modules)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & modules for m in modules}
    assert strongly_connected(modules, edges) == []


def test_no_import_circle_between_sibling_packages(graph):
    """Within every package, its children (subpackages and modules) import each other without a
    circle, counting every import made anywhere inside a child."""
    modules = set(graph.modules)
    packages = {m for m in modules if any(o.startswith(m + ".") for o in modules)}
    circles = []
    for package in sorted(packages):
        depth = package.count(".") + 1

        def child(module: str) -> str:
            return ".".join(module.split(".")[:depth + 1])

        members = {m for m in modules if m.startswith(package + ".")}
        edges: Dict[str, Set[str]] = defaultdict(set)
        for m in members:
            for target in graph.find_modules_directly_imported_by(m):
                if target in members and child(target) != child(m):
                    edges[child(m)].add(child(target))
        circles += strongly_connected({child(m) for m in members}, edges)
    assert circles == []


def test_no_camserve_import_inside_a_function_but_for_an_optional_extra():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                if isinstance(node, ast.ImportFrom) and node.level:
                    names = ["camserve (relative)"]
                for name in names:
                    if name.startswith("camserve") and not name.startswith(OPTIONAL_EXTRAS):
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert found == []


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", str(REPO / ".importlinter")], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_registry_answers_every_family():
    from camserve.engine.methods import REGISTRY

    families = {REGISTRY.lookup(n, REGISTRY.lookup(n, "embed").task if n in REGISTRY.names(task="embed")
                                else "classify").family for n in REGISTRY.names()}
    assert families == {"cam", "lrp", "captum", "similarity"}
    assert REGISTRY.lookup("Grad-CAM").name == "gradcam" and REGISTRY.lookup("captum.ig").name == \
        "captum.integrated_gradients"
    assert REGISTRY.names(task="embed") == ["fam", "gradcam_similarity"]
    # serving and the CLI ask the registry: no family module's name test is used outside its family
    strays = [str(p.relative_to(REPO)) for p in SRC.rglob("*.py")
              if "engine/methods" not in str(p) and "is_captum(" in p.read_text()]
    assert strays == []


def test_tests_never_import_benchmarks():
    """Benchmarks may use the tests' server kits; tests never reach into benchmarks/."""
    found = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            text = ast.unparse(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Call)) else ""
            if "benchmarks" in text and ("sys.path" in text or isinstance(node, (ast.Import, ast.ImportFrom))):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []
