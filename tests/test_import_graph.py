"""Imports flow one way: the graph of routelab's modules (every import statement, at the top or
inside functions) has no cycle, and the leaves import nothing of routelab."""

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "routelab"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the routelab modules it imports (``from a.b import c`` counts a.b, and a.b.c if a module)."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                candidates = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for c in candidates:
                while c and c not in files:
                    c = c.rpartition(".")[0]
                if c and c != name:
                    targets.add(c)
        graph[name] = targets
    return graph


def test_no_import_cycles():
    try:
        list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


@pytest.mark.parametrize("leaf", ["routelab.errors", "routelab.registry", "routelab.io"])
def test_leaves_import_nothing_of_routelab(leaf):
    assert import_graph()[leaf] == set()


def test_the_graph_sees_cycles():
    """Guards the test above: a cycle written into the graph is found."""
    graph = import_graph()
    graph["routelab.errors"] = {"routelab.config"}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())
