"""The floors of docs/architecture.md: import-linter's contracts hold, and no module of lmlab imports itself
back through a chain of imports (function-level imports included)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cycle(graph) -> list[str] | None:
    """One import cycle among the modules of ``graph``, or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph.find_modules_directly_imported_by(module)):
            if not dep.startswith("lmlab"):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph.modules):
        if module.startswith("lmlab") and module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycle():
    graph = grimp.build_graph("lmlab", include_external_packages=False)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_known_cycle():
    class Graph:
        modules = {"lmlab.a", "lmlab.b", "lmlab.c"}
        edges = {"lmlab.a": {"lmlab.b"}, "lmlab.b": {"lmlab.c"}, "lmlab.c": {"lmlab.a"}}

        def find_modules_directly_imported_by(self, m):
            return self.edges[m]

    assert _cycle(Graph()) == ["lmlab.a", "lmlab.b", "lmlab.c", "lmlab.a"]
    Graph.edges["lmlab.c"] = set()
    assert _cycle(Graph()) is None


def test_layers_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
