"""The house plan holds: imports flow down the wings, never sideways, and never in a cycle.

Every `import` in `featstore/` (at module level or in functions; not those under TYPE_CHECKING,
which name a type and never run) is read with `ast`; each module belongs to a level: the ground
floor (modules directly in `featstore/`) < the store < the sources and the stats (one level:
neither imports the other) < analysis < the explorer < the command line and `stages`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import featstore

ROOT = Path(featstore.__file__).parent
# Wing -> level; modules directly in featstore/ are the ground floor, level 0.
# `stages` (every stage without Dagster) sits beside the command line, on top.
LEVELS = {"store": 1, "sources": 2, "stats": 2, "analysis": 3, "explorer": 4, "cli": 5, "stages": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing(module: str) -> str:
    """The wing a featstore module lives in ("" for the ground floor)."""
    parts = module.split(".")
    if len(parts) < 2:
        return ""  # the package itself: its __init__ re-exports the public API
    return parts[1] if parts[1] in LEVELS else ""


def imports() -> nx.DiGraph:
    """featstore module -> each featstore module it imports (edge attribute `top`: at module
    level, run when the module is imported)."""
    graph = nx.DiGraph()
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    for name, path in modules.items():
        graph.add_node(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = _without_type_checking(ast.parse(path.read_text(), str(path)))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                # `from featstore.stats import query`: the submodule when there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]  # fmt: skip
            for target in targets:
                if target.split(".")[0] == "featstore" and target != name:
                    at_top = id(node) in top or graph.get_edge_data(name, target, {}).get("top")
                    graph.add_edge(name, target, top=bool(at_top))
    return graph


def _without_type_checking(tree: ast.Module) -> ast.Module:
    """The tree less its `if TYPE_CHECKING:` blocks."""
    tree.body = [
        node for node in tree.body
        if not (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
    ]  # fmt: skip
    return tree


def level(module: str) -> int:
    return LEVELS.get(wing(module), 0)


def test_imports_flow_down_and_never_sideways():
    graph = imports()
    assert graph.number_of_nodes() > 40  # the walk found the package
    wrong = []
    for a, b in graph.edges:
        if a == "featstore" or b == "featstore" or wing(a) == wing(b):
            continue  # the package's own re-exports; a wing's modules among themselves
        if level(b) >= level(a):
            wrong.append(f"{a} ({wing(a) or 'ground'}) imports {b} ({wing(b) or 'ground'})")
    assert not wrong, "\n".join(wrong)


def test_the_ground_floor_imports_only_the_ground_floor():
    graph = imports()
    ground = [m for m in graph if wing(m) == "" and m != "featstore"]
    assert {"featstore.errors", "featstore.files", "featstore.defaults"} <= set(ground)
    upward = [(a, b) for a in ground for b in graph.successors(a) if wing(b) != ""]
    assert not upward


def test_no_import_cycle():
    """None at import time (a function's import of a sibling, run later, may close a loop)."""
    graph = imports()
    graph.remove_node("featstore")  # `import featstore.x` runs the package's __init__ first
    loading = graph.edge_subgraph([(a, b) for a, b, top in graph.edges(data="top") if top])
    assert list(nx.simple_cycles(loading)) == []
