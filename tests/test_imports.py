"""Every module imports on its own with warnings as errors, and the package's imports form no
cycle (as aiohttp's own test_circular_imports.py checks)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gogpt"
MODULES = sorted(f"gogpt.{path.stem}" for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def import_graph() -> dict[str, set[str]]:
    """Each gogpt module and the gogpt modules it imports, `TYPE_CHECKING` blocks included."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        name = f"gogpt.{path.stem}" if path.stem != "__init__" else "gogpt"
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                imported.add(f"gogpt.{node.module}")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gogpt."):
                imported.add(node.module)
        graph[name] = imported
    return graph


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone_without_warnings(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"import {module}"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_modules_import_each_other_without_a_cycle() -> None:
    graph = import_graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join((*path, module))
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_leaf_modules_import_nothing_of_gogpt() -> None:
    graph = import_graph()
    assert graph["gogpt.metrics"] == set()
    assert graph["gogpt.config"] == set()
    assert graph["gogpt.store"] == set()
    assert graph["gogpt.sqlite_schema"] == set()
    assert graph["gogpt.sqlite_statements"] == set()


if __name__ == "__main__":  # print the graph: python tests/test_imports.py
    for module, imported in sorted(import_graph().items()):
        print(f"{module:22} -> {', '.join(sorted(imported)) or '(nothing of gogpt)'}")
