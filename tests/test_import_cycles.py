"""No import cycles inside ``lightning_adapters``: the package's modules form a layered graph.

The graph is read from the source (``ast``), not from ``sys.modules``: every ``import``/``from ... import`` of a
package module counts, at module level or inside a function (a deferred import that dodges a cycle at run time is
still a cycle in the design); only imports under ``if TYPE_CHECKING:`` (annotations) do not. A package's
``__init__`` running before its sub-modules is Python's mechanics, not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_adapters"


def module_files(package_dir: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package (``__init__`` files name their package)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its source, except under ``if TYPE_CHECKING:``."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_node(other)
                continue
            visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # ``from pkg import module`` imports that module; ``from module import name`` the module itself.
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
        visit(node)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return {m for m in found if m in modules and m != name}


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the package's own modules."""
    modules = module_files(package_dir, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(out)


# Cycles known and not yet removed (none now). Listed so that any new cycle fails this test, and so does the removal
# of a listed one: then delete its entry.
KNOWN_CYCLES: list[list[str]] = []


def test_the_package_has_no_import_cycles() -> None:
    found = cycles(import_graph(PACKAGE, "lightning_adapters"))
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert new == [], "import cycles (each a group of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in new
    )
    gone = [c for c in KNOWN_CYCLES if c not in found]
    assert gone == [], f"these cycles are gone: delete them from KNOWN_CYCLES: {gone}"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.py": "from pkg import b\n", "b.py": "import pkg.a\n"}, [["pkg.a", "pkg.b"]]),
        ({"a.py": "def f():\n    from pkg.b import x\n", "b.py": "from .a import y\n"}, [["pkg.a", "pkg.b"]]),
        (
            {
                "a.py": "import pkg.b\n",
                "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n",
            },
            [],
        ),
        (
            {"a.py": "import pkg.b\n", "b.py": "import pkg.c\n", "c.py": "from pkg.a import z\n"},
            [["pkg.a", "pkg.b", "pkg.c"]],
        ),
        ({"__init__.py": "from pkg.a import f\n", "a.py": "import os\n"}, []),
    ],
    ids=["direct", "deferred-and-relative", "type-checking-only", "three-modules", "package-init"],
)
def test_the_cycle_finder_on_small_packages(tmp_path: Path, files: dict[str, str], expected: list[list[str]]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert cycles(import_graph(tmp_path, "pkg")) == expected
