"""No import cycles inside fxforge: each module can be read (and imported) after the ones it uses.

The graph is built from the source with `ast`, not by importing: an edge is a module-level import
(imports inside functions run later and do not count, nor do `if TYPE_CHECKING:` blocks, which
never run). `from pkg import name` where `name` is a submodule is an import of that submodule;
importing a package is an import of its `__init__`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "fxforge"


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package (`pkg/__init__.py` is `pkg`)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (not in functions or TYPE_CHECKING)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(statements: list[ast.stmt]) -> None:
        for stmt in statements:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                found.append(stmt)
            elif isinstance(stmt, ast.If):
                if not _is_type_checking(stmt.test):
                    visit(stmt.body)
                visit(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                visit(stmt.body)
                for handler in stmt.handlers:
                    visit(handler.body)
                visit(stmt.orelse)
                visit(stmt.finalbody)
            elif isinstance(stmt, (ast.With, ast.ClassDef)):
                visit(stmt.body)

    visit(tree.body)
    return found


def import_graph(modules: dict[str, Path]) -> nx.DiGraph:
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        is_package = path.name == "__init__.py"
        for stmt in _module_level_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(stmt, ast.Import):
                targets = [alias.name for alias in stmt.names]
            else:
                if stmt.level:  # relative: resolve against this module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (stmt.level - 1)]
                    base = ".".join(package + ([stmt.module] if stmt.module else []))
                else:
                    base = stmt.module or ""
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in stmt.names]
            for target in targets:
                if target in modules and target != name:
                    graph.add_edge(name, target)
    return graph


def _all_imports(path: Path) -> set[str]:
    """Every module name an import statement anywhere in `path` names (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_runtime_does_not_import_passes():
    """Runtime code reads what passes leave in gm.meta through fxforge/runtime/meta_keys.py and
    builds inputs with fxforge/runtime/cache_inputs.py; it never imports a pass, not even lazily."""
    offenders = {name: sorted(n for n in _all_imports(path) if n.startswith("fxforge.passes"))
                 for name, path in module_files().items() if name.startswith("fxforge.runtime")}
    offenders = {name: found for name, found in offenders.items() if found}
    assert not offenders, f"fxforge.runtime imports passes (move what it needs into fxforge/runtime/): {offenders}"


def test_the_graph_sees_real_imports():
    """Guard against a parser that finds nothing (and so no cycle)."""
    graph = import_graph(module_files())
    assert graph.has_edge("fxforge", "fxforge.api")
    assert graph.has_edge("fxforge.passes.pipeline", "fxforge.passes.base")
    assert graph.number_of_edges() > 200


def test_a_cycle_is_found_and_named(tmp_path):
    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from toy import b\n")
    (pkg / "b.py").write_text("def f():\n    import toy.c\nfrom toy.c import thing\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import toy.b\nfrom . import a\n")
    cycle = nx.find_cycle(import_graph(module_files(pkg)))
    assert {edge[0] for edge in cycle} == {"toy.a", "toy.b", "toy.c"}


def test_no_import_cycles_in_fxforge():
    graph = import_graph(module_files())
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    details = []
    for component in cycles:
        cycle = nx.find_cycle(graph.subgraph(component))
        details.append(" -> ".join([edge[0] for edge in cycle] + [cycle[-1][1]]))
    assert not cycles, ("import cycles inside fxforge (move the shared piece to a module both import, "
                        "or import inside the function that needs it):\n" + "\n".join(details))
