"""Imports flow one way: the graph of routelab's modules (every import statement, at the top or
inside functions) has no cycle, the leaves import nothing of routelab, and no module imports one of
a higher layer (``LAYERS``), so packages depend on each other in one direction only."""

import ast
import functools
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "routelab"

# Lowest first. A module may import modules of its own layer or of lower ones, never of a higher one.
# An entry names a module or a package (every module under it); a module belongs to its longest
# matching entry, and "routelab" names the package's own __init__ (the public API) only.
LAYERS = (
    # leaves and near-leaves: errors, files, devices, the data source table, a Hugging Face folder on disk
    ("routelab.errors", "routelab.registry", "routelab.io", "routelab.lock", "routelab.precision",
     "routelab.embeddings", "routelab.device", "routelab.data.sources", "routelab.hf_folder"),
    ("routelab.options", "routelab.outputs", "routelab.presets"),
    ("routelab.conversion", "routelab.yaml_io"),  # dict <-> dataclass; YAML, bases and --set: the schema uses them
    ("routelab.config",),  # the schema: of the data package it reads only the source table
    # data/ holds the training batches too (routelab.data.batches): it knows nothing of train/
    ("routelab.attention", "routelab.ffn", "routelab.moe", "routelab.data"),
    ("routelab.model",),  # knows nothing of pretrained/ (from_hf lives there)
    ("routelab", "routelab.generate", "routelab.upcycle"),  # the public API; transforms of a built model
    # train/: setup (builds a run), step (one update), trainer (the loop), export (model/), ...
    ("routelab.train",),  # starts runs from other weights through routelab.upcycle, not pretrained/
    ("routelab.pretrained",),  # builds on runs: imports train, never the other way round
    ("routelab.compare", "routelab.report"),
    ("routelab.launch", "routelab.threads"),  # the command line's process launcher (torchrun) and OpenMP re-exec
    ("routelab.cli", "routelab.__main__"),
)
# modules that only re-export another's names, kept for older imports -> the module holding the code;
# outside the re-export's own package, import the home
RE_EXPORTS = {
    "routelab.train.device": "routelab.device",
    "routelab.pretrained.upcycle": "routelab.upcycle",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the routelab modules it imports (``from a.b import c`` counts a.b, and a.b.c if a module).
    A fresh copy each call (tests write edges into it); the files are parsed once."""
    return {name: set(targets) for name, targets in _parsed_graph().items()}


@functools.cache
def _parsed_graph() -> dict[str, set[str]]:
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


@pytest.mark.parametrize(
    "leaf", ["routelab.errors", "routelab.registry", "routelab.io", "routelab.device", "routelab.data.sources"]
)
def test_leaves_import_nothing_of_routelab(leaf):
    assert import_graph()[leaf] == set()


def test_the_graph_sees_cycles():
    """Guards the test above: a cycle written into the graph is found."""
    graph = import_graph()
    graph["routelab.errors"] = {"routelab.config"}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())


# ----------------------------------------------------------------------------------------------
# layers


def entry_of(module: str) -> str | None:
    """The ``LAYERS`` entry ``module`` belongs to (its longest match), or None."""
    found = [e for layer in LAYERS for e in layer if module == e or (e != "routelab" and module.startswith(e + "."))]
    return max(found, key=len, default=None)


def layer_of(module: str) -> int | None:
    entry = entry_of(module)
    return None if entry is None else next(i for i, layer in enumerate(LAYERS) if entry in layer)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every edge that imports a higher layer, or a re-export from outside its package, one line each."""
    bad = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            la, lb = layer_of(a), layer_of(b)
            if la is not None and lb is not None and lb > la:
                bad.append(f"{a} -> {b}: {entry_of(a)} (layer {la}) may not import {entry_of(b)} (layer {lb})")
            package = b.rpartition(".")[0]
            if b in RE_EXPORTS and not (a == package or a.startswith(package + ".")):
                bad.append(f"{a} -> {b}: import {RE_EXPORTS[b]} ({b} only re-exports it)")
    return bad


def entry_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle between ``LAYERS`` entries (packages importing each other, directly or around a loop),
    as the module edges that make it; None if there is none."""
    entries: dict[str, set[str]] = {}
    for a, targets in graph.items():
        ea = entry_of(a)
        entries.setdefault(ea, set()).update(entry_of(b) for b in targets if entry_of(b) != ea)
    try:
        list(graphlib.TopologicalSorter(entries).static_order())
    except graphlib.CycleError as e:
        loop = e.args[1][::-1]  # graphlib puts what a node imports before it; reversed, each imports the next
        return [f"{a} -> {b}" for ea, eb in zip(loop, loop[1:]) for a in sorted(graph) if entry_of(a) == ea
                for b in sorted(graph[a]) if entry_of(b) == eb]
    return None


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in import_graph() if entry_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {', '.join(unplaced)}"


def test_no_module_imports_a_higher_layer():
    bad = layer_violations(import_graph())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_packages_import_each_other_one_way():
    loop = entry_cycle(import_graph())
    assert loop is None, "packages importing each other both ways:\n" + "\n".join(loop)


def test_the_layer_rules_see_bad_edges():
    """Guards the layer tests above: edges written into the graph against the layers are each found."""
    graph = import_graph()
    written = {
        ("routelab.model", "routelab.pretrained.hf"),
        ("routelab.train.init_from", "routelab.pretrained.upcycle"),
        ("routelab.config", "routelab.data.tasks"),
        ("routelab.report.inspect", "routelab.train.device"),
    }
    for a, b in written:
        graph[a] = graph[a] | {b}
    found = layer_violations(graph)
    assert {tuple(line.split(":")[0].split(" -> ")) for line in found} >= written
    graph = import_graph()
    graph["routelab.ffn"] = graph["routelab.ffn"] | {"routelab.moe.layer"}  # moe imports ffn: now both ways
    loop = entry_cycle(graph)
    assert loop is not None and "routelab.ffn -> routelab.moe.layer" in loop
